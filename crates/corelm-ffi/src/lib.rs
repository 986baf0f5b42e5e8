//! The C ABI of the corelm runtime (header: `include/corelm.h`). A model handle owns a backend,
//! the tokenizer and chat template of its package, and the conversation's KV cache; generation
//! streams UTF-8 text through a callback. Every function reports failure by return value and,
//! when `error` is not null, a message the caller frees with `corelm_string_free`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr;

use corelm_format::Package;
use corelm_runtime::chat::Message;
use corelm_runtime::generate::{generate, GenerateParams};
use corelm_runtime::model::TextModel;
use corelm_runtime::sampler::SamplingParams;

/// A loaded model (opaque).
pub struct CorelmModel {
    model: TextModel,
    messages: Vec<Message>,
}

/// Where the model runs.
#[repr(C)]
pub enum CorelmBackend {
    /// corelm's reference interpreter (any platform).
    CorelmBackendReference = 0,
    /// Core ML (Apple platforms), with all compute units.
    CorelmBackendCoreMl = 1,
}

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

/// Receives each new piece of generated text (UTF-8, not NUL-terminated).
pub type CorelmTextCallback = Option<extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void)>;

fn report(error: *mut *mut c_char, message: String) {
    if !error.is_null() {
        let text = CString::new(message.replace('\0', " ")).expect("NULs were replaced");
        // SAFETY: the caller passed a valid pointer to write the message pointer into.
        unsafe { *error = text.into_raw() };
    }
}

fn text_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{what} is null"));
    }
    // SAFETY: the caller passes a NUL-terminated string that outlives this call.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| format!("{what} is not UTF-8"))
}

fn open(path: &str, backend: CorelmBackend) -> Result<TextModel, String> {
    let pkg = Package::open(Path::new(path)).map_err(|e| e.to_string())?;
    match backend {
        CorelmBackend::CorelmBackendReference => TextModel::open_reference(&pkg).map_err(|e| e.to_string()),
        #[cfg(target_vendor = "apple")]
        CorelmBackend::CorelmBackendCoreMl => {
            let cache = std::env::temp_dir().join("corelm-compiled");
            TextModel::open_coreml(&pkg, corelm_runtime::coreml::ComputeUnits::All, &cache).map_err(|e| e.to_string())
        }
        #[cfg(not(target_vendor = "apple"))]
        CorelmBackend::CorelmBackendCoreMl => Err("the Core ML backend runs on Apple platforms only".into()),
    }
}

/// Greedy decoding.
#[no_mangle]
pub extern "C" fn corelm_sampling_default() -> CorelmSampling {
    CorelmSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
}

/// Opens a package converted by corelm. Returns null on failure (see `error`).
#[no_mangle]
pub extern "C" fn corelm_model_open(
    package_path: *const c_char,
    backend: CorelmBackend,
    error: *mut *mut c_char,
) -> *mut CorelmModel {
    match text_arg(package_path, "package_path").and_then(|p| open(p, backend)) {
        Ok(model) => Box::into_raw(Box::new(CorelmModel { model, messages: vec![] })),
        Err(e) => {
            report(error, e);
            ptr::null_mut()
        }
    }
}

/// Frees a model (null is ignored).
///
/// # Safety
/// `model` is null or a pointer from `corelm_model_open` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn corelm_model_free(model: *mut CorelmModel) {
    if !model.is_null() {
        // SAFETY: the pointer came from corelm_model_open and is freed once.
        drop(unsafe { Box::from_raw(model) });
    }
}

/// Forgets the conversation (messages and KV cache). Returns 0, or -1 on failure.
///
/// # Safety
/// `model` is null or a live model, used by one thread at a time; `error` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn corelm_reset(model: *mut CorelmModel, error: *mut *mut c_char) -> i32 {
    // SAFETY: the caller passes a live model from corelm_model_open, used by one thread at a time.
    let Some(m) = (unsafe { model.as_mut() }) else {
        report(error, "model is null".into());
        return -1;
    };
    m.messages.clear();
    match m.model.backend.reset() {
        Ok(()) => 0,
        Err(e) => {
            report(error, e.to_string());
            -1
        }
    }
}

/// Adds a user message to the conversation and streams the assistant's reply through
/// `on_text`. `system` may be null. Returns the number of tokens generated, or -1 on failure.
///
/// # Safety
/// `model` is null or a live model, used by one thread at a time; the strings are null or
/// NUL-terminated; `error` is null or writable.
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
    // SAFETY: as in corelm_reset.
    let Some(m) = (unsafe { model.as_mut() }) else {
        report(error, "model is null".into());
        return -1;
    };
    let result = (|| -> Result<i64, String> {
        let user = text_arg(user_message, "user_message")?;
        if m.messages.is_empty() && !system.is_null() {
            m.messages.push(Message::new("system", text_arg(system, "system")?));
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
        let g = generate(m.model.backend.as_mut(), &m.model.tokenizer, &ids, &params, &mut emit)
            .map_err(|e| e.to_string())?;
        m.messages.push(Message::new("assistant", g.text.trim()));
        Ok(g.generated_ids.len() as i64)
    })();
    result.unwrap_or_else(|e| {
        m.messages.pop();
        report(error, e);
        -1
    })
}

/// Frees a string corelm returned (error messages).
///
/// # Safety
/// `s` is null or a string from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn corelm_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the string came from CString::into_raw in this library.
        drop(unsafe { CString::from_raw(s) });
    }
}
