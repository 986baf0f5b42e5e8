//! The C ABI of the corelm runtime (header: `include/corelm.h`). A model handle owns a backend,
//! the tokenizer and chat template of its package, and the conversation's KV cache; generation
//! streams UTF-8 text through a callback. Every function reports failure by return value and,
//! when `error` is not null, a message the caller frees with `corelm_string_free`.
//!
//! No panic crosses into the host app: every exported function runs its body under
//! `catch_unwind` and turns a panic (a bug in corelm) into an error. A model whose call panicked
//! may hold a half-updated conversation, so it refuses further calls until `corelm_reset`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use corelm_format::Package;
use corelm_runtime::chat::Message;
use corelm_runtime::generate::{generate, GenerateParams};
use corelm_runtime::model::TextModel;
use corelm_runtime::sampler::SamplingParams;

/// A loaded model (opaque).
pub struct CorelmModel {
    model: TextModel,
    messages: Vec<Message>,
    /// Set while a call runs: a call from inside `on_text` is refused, not run re-entrantly.
    busy: AtomicBool,
    /// Set when a call panicked; cleared by `corelm_reset`.
    poisoned: bool,
}

impl CorelmModel {
    /// The conversation so far (for Rust users of this crate and its tests).
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }
}

/// `backend` of `corelm_model_open`: corelm's reference interpreter (any platform; a library
/// built without the `interpreter` feature refuses it).
pub const CORELM_BACKEND_REFERENCE: i32 = 0;
/// `backend` of `corelm_model_open`: Core ML (Apple platforms), with all compute units.
pub const CORELM_BACKEND_COREML: i32 = 1;

/// Sampling settings; `corelm_sampling_default` gives greedy decoding.
#[repr(C)]
pub struct CorelmSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Receives each new piece of generated text (UTF-8, not NUL-terminated). It must not call
/// back into corelm with the same model (such a call fails with an error).
pub type CorelmTextCallback = Option<extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void)>;

fn report(error: *mut *mut c_char, message: String) {
    if !error.is_null() {
        let text = CString::new(message.replace('\0', " ")).expect("NULs were replaced");
        // SAFETY: the caller passed a valid pointer to write the message pointer into.
        unsafe { *error = text.into_raw() };
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in corelm (please report it): {what}")
}

/// Runs `body`; an `Err` or a panic is reported through `error` and gives `failed`.
fn guarded<T>(error: *mut *mut c_char, failed: T, body: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            report(error, e);
            failed
        }
        Err(payload) => {
            report(error, panic_message(payload.as_ref()));
            failed
        }
    }
}

/// Runs `body` on a live model: refuses null, re-entrant calls and a model poisoned by an
/// earlier panic (unless `resets`), and poisons the model when `body` panics.
///
/// # Safety
/// `model` is null or a live model from `corelm_model_open`, used by one thread at a time.
unsafe fn with_model<T>(
    model: *mut CorelmModel,
    error: *mut *mut c_char,
    failed: T,
    resets: bool,
    body: impl FnOnce(&mut CorelmModel) -> Result<T, String>,
) -> T {
    if model.is_null() {
        report(error, "model is null".into());
        return failed;
    }
    // SAFETY: `model` is live; only the atomic flag is read through a shared reference, so a
    // re-entrant call from `on_text` never creates a second `&mut` to the model.
    let busy = unsafe { &(*model).busy };
    if busy.swap(true, Ordering::Acquire) {
        report(error, "corelm was called from inside its own on_text callback with the same model".into());
        return failed;
    }
    let result = guarded(error, None, || {
        // SAFETY: live, not null, and no other call is running on it (the flag above).
        let m = unsafe { &mut *model };
        if m.poisoned && !resets {
            return Err("an earlier call on this model failed inside corelm: call corelm_reset first".into());
        }
        match catch_unwind(AssertUnwindSafe(|| body(m))) {
            Ok(r) => r.map(Some),
            Err(payload) => {
                m.poisoned = true;
                Err(panic_message(payload.as_ref()))
            }
        }
    });
    busy.store(false, Ordering::Release);
    result.unwrap_or(failed)
}

fn text_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{what} is null"));
    }
    // SAFETY: the caller passes a NUL-terminated string that outlives this call.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| format!("{what} is not UTF-8"))
}

/// Where compiled Core ML models are cached when the caller names no folder: Application
/// Support, which iOS keeps (tmp is purged), as Apple recommends for re-creatable data.
#[cfg_attr(not(target_vendor = "apple"), allow(dead_code))]
fn default_cache_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join("Library/Application Support/corelm/compiled"),
        None => std::env::temp_dir().join("corelm-compiled"),
    }
}

fn open(path: &str, backend: i32, cache_dir: Option<&str>) -> Result<TextModel, String> {
    if backend != CORELM_BACKEND_REFERENCE && backend != CORELM_BACKEND_COREML {
        return Err(format!(
            "unknown backend {backend}: CORELM_BACKEND_REFERENCE ({CORELM_BACKEND_REFERENCE}) or \
             CORELM_BACKEND_COREML ({CORELM_BACKEND_COREML})"
        ));
    }
    let pkg = Package::open(Path::new(path)).map_err(|e| e.to_string())?;
    if backend == CORELM_BACKEND_REFERENCE {
        #[cfg(feature = "interpreter")]
        return TextModel::open_reference(&pkg).map_err(|e| e.to_string());
        #[cfg(not(feature = "interpreter"))]
        return Err("this build of corelm has no reference interpreter (its `interpreter` feature is off)".into());
    }
    #[cfg(target_vendor = "apple")]
    {
        let cache = cache_dir.map(PathBuf::from).unwrap_or_else(default_cache_dir);
        TextModel::open_coreml(&pkg, corelm_runtime::coreml::ComputeUnits::All, &cache).map_err(|e| e.to_string())
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        let _ = (pkg, cache_dir);
        Err("the Core ML backend runs on Apple platforms only".into())
    }
}

/// Greedy decoding.
#[no_mangle]
pub extern "C" fn corelm_sampling_default() -> CorelmSampling {
    CorelmSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
}

/// Opens a package converted by corelm on `backend` (`CORELM_BACKEND_REFERENCE` or
/// `CORELM_BACKEND_COREML`). `cache_dir` is where Core ML's compiled model is kept (null:
/// `~/Library/Application Support/corelm/compiled`). Returns null on failure (see `error`).
#[no_mangle]
pub extern "C" fn corelm_model_open(
    package_path: *const c_char,
    backend: i32,
    cache_dir: *const c_char,
    error: *mut *mut c_char,
) -> *mut CorelmModel {
    guarded(error, ptr::null_mut(), || {
        let path = text_arg(package_path, "package_path")?;
        let cache = if cache_dir.is_null() { None } else { Some(text_arg(cache_dir, "cache_dir")?) };
        let model = open(path, backend, cache)?;
        let handle = CorelmModel { model, messages: vec![], busy: AtomicBool::new(false), poisoned: false };
        Ok(Box::into_raw(Box::new(handle)))
    })
}

/// Frees a model (null is ignored).
///
/// # Safety
/// `model` is null or a pointer from `corelm_model_open` not yet freed, and no call on it runs.
#[no_mangle]
pub unsafe extern "C" fn corelm_model_free(model: *mut CorelmModel) {
    if !model.is_null() {
        // A panic while dropping is swallowed: there is nobody to tell.
        // SAFETY: the pointer came from corelm_model_open and is freed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// Forgets the conversation (messages and KV cache), also after a failed call. Returns 0, or
/// -1 on failure.
///
/// # Safety
/// `model` is null or a live model, used by one thread at a time; `error` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn corelm_reset(model: *mut CorelmModel, error: *mut *mut c_char) -> i32 {
    // SAFETY: as the caller promises.
    unsafe {
        with_model(model, error, -1, true, |m| {
            m.messages.clear();
            m.model.backend.reset().map_err(|e| e.to_string())?;
            m.poisoned = false;
            Ok(0)
        })
    }
}

/// Adds a user message to the conversation and streams the assistant's reply through
/// `on_text`. `system` may be null. Returns the number of tokens generated, or -1 on failure,
/// in which case the conversation is as it was before the call.
///
/// # Safety
/// `model` is null or a live model, used by one thread at a time; the strings are null or
/// NUL-terminated; `error` is null or writable; `on_text` does not call corelm with `model`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn corelm_chat(
    model: *mut CorelmModel,
    system: *const c_char,
    user_message: *const c_char,
    sampling: CorelmSampling,
    max_new_tokens: u32,
    on_text: CorelmTextCallback,
    user_data: *mut c_void,
    error: *mut *mut c_char,
) -> i64 {
    // SAFETY: as the caller promises.
    unsafe {
        with_model(model, error, -1, false, |m| {
            // Arguments are checked before the conversation changes.
            let user = text_arg(user_message, "user_message")?;
            let system = if system.is_null() { None } else { Some(text_arg(system, "system")?) };
            let before = m.messages.len();
            let reply = reply(m, system, user, sampling, max_new_tokens, on_text, user_data);
            if reply.is_err() {
                m.messages.truncate(before);
            }
            reply
        })
    }
}

/// The body of `corelm_chat` once its arguments are known to be good.
fn reply(
    m: &mut CorelmModel,
    system: Option<&str>,
    user: &str,
    sampling: CorelmSampling,
    max_new_tokens: u32,
    on_text: CorelmTextCallback,
    user_data: *mut c_void,
) -> Result<i64, String> {
    if let (true, Some(system)) = (m.messages.is_empty(), system) {
        m.messages.push(Message::new("system", system));
    }
    m.messages.push(Message::new("user", user));
    // Each call renders the whole conversation and starts from an empty cache: simple and
    // always consistent with the template.
    m.model.backend.reset().map_err(|e| e.to_string())?;
    let ids = m.model.chat_prompt(&m.messages).map_err(|e| e.to_string())?;
    let params = GenerateParams {
        max_new_tokens: max_new_tokens as usize,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_k: sampling.top_k as usize,
            top_p: sampling.top_p,
            min_p: sampling.min_p,
            repetition_penalty: sampling.repetition_penalty,
            seed: sampling.seed,
            ..SamplingParams::default()
        },
        eos_ids: m.model.eos_ids.clone(),
        stop_strings: vec![],
        truncate_prompt: true,
    };
    let mut emit = |t: &str| {
        if let Some(cb) = on_text {
            cb(t.as_ptr() as *const c_char, t.len(), user_data);
        }
    };
    let g = generate(&mut m.model.backend, &m.model.tokenizer, &ids, &params, &mut emit).map_err(|e| e.to_string())?;
    m.messages.push(Message::new("assistant", g.text.trim()));
    Ok(g.generated_ids.len() as i64)
}

/// Frees a string corelm returned (error messages).
///
/// # Safety
/// `s` is null or a string from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn corelm_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the string came from CString::into_raw in this library.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { CString::from_raw(s) })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_error(error: *mut c_char) -> String {
        assert!(!error.is_null(), "no error message");
        // SAFETY: a message this library wrote.
        let text = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { corelm_string_free(error) };
        text
    }

    #[test]
    fn a_panic_becomes_an_error_and_a_failure_value() {
        let mut error = ptr::null_mut();
        let got: i64 = guarded(&mut error, -1, || panic!("index out of bounds: the len is 3 but the index is 7"));
        assert_eq!(got, -1);
        let text = take_error(error);
        assert!(text.contains("internal error in corelm") && text.contains("the index is 7"), "{text}");
        let mut error = ptr::null_mut();
        assert_eq!(guarded(&mut error, -1, || Ok(5)), 5);
        assert!(error.is_null());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut error = ptr::null_mut();
        assert!(corelm_model_open(ptr::null(), CORELM_BACKEND_REFERENCE, ptr::null(), &mut error).is_null());
        assert_eq!(take_error(error), "package_path is null");
        let path = CString::new("/no/such.mlpackage").unwrap();
        let mut error = ptr::null_mut();
        assert!(corelm_model_open(path.as_ptr(), CORELM_BACKEND_REFERENCE, ptr::null(), &mut error).is_null());
        assert!(take_error(error).contains("such.mlpackage"));
        let mut error = ptr::null_mut();
        assert!(corelm_model_open(path.as_ptr(), 7, ptr::null(), &mut error).is_null());
        assert!(take_error(error).starts_with("unknown backend 7"));
        let mut error = ptr::null_mut();
        // SAFETY: a null model is allowed.
        assert_eq!(unsafe { corelm_reset(ptr::null_mut(), &mut error) }, -1);
        assert_eq!(take_error(error), "model is null");
    }
}
