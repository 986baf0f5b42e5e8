//! The Core ML backend (Apple platforms): compiles the `.mlpackage` once, caches the compiled
//! model under a content hash, loads each of its functions with the chosen compute units, and
//! runs predictions for [`LanguageModel`](corelm_contract::driver::LanguageModel), which drives
//! every interface corelm writes exactly as it drives the reference interpreter. The driver's
//! tensors cross as `MLMultiArray`s (int32, fp16, fp32); KV caches live in one `MLState` (iOS 18
//! packages) or are the arrays an iOS 16/17 package returned, fed straight back.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use corelm_contract::driver::Executor;
use corelm_contract::names;
use corelm_contract::tensor::{HostData, HostTensor, Tensors};
use corelm_format::{DType, Package};
use half::f16;
use half::slice::HalfFloatSliceExt;
use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::{AnyObject, NSObjectProtocol, ProtocolObject, Sel};
use objc2::sel;
use objc2::AnyThread;
use objc2_core_ml::{
    MLComputeUnits, MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLModel, MLModelConfiguration,
    MLMultiArray, MLMultiArrayDataType, MLState,
};
use objc2_foundation::{NSArray, NSDictionary, NSError, NSNumber, NSString, NSURL};

use crate::compile_cache::cached_compile;
use crate::strided;
use crate::{Error, Result};

/// Which processors Core ML may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeUnits {
    All,
    CpuAndGpu,
    CpuAndNeuralEngine,
    CpuOnly,
}

impl ComputeUnits {
    fn to_ml(self) -> MLComputeUnits {
        match self {
            ComputeUnits::All => MLComputeUnits::All,
            ComputeUnits::CpuAndGpu => MLComputeUnits::CPUAndGPU,
            ComputeUnits::CpuAndNeuralEngine => MLComputeUnits::CPUAndNeuralEngine,
            ComputeUnits::CpuOnly => MLComputeUnits::CPUOnly,
        }
    }
}

fn ns_error(what: &str, e: Retained<NSError>) -> Error {
    Error::invalid(format!("{what}: {}", e.localizedDescription()))
}

fn file_url(path: &Path) -> Retained<NSURL> {
    NSURL::fileURLWithPath(&NSString::from_str(&path.to_string_lossy()))
}

/// Compiles `pkg` into `cache_dir/<content hash>.mlmodelc` unless it is there already: two
/// packages that differ in any weight value get their own compiled model
/// ([`Package::content_hash`]). Core ML compiles into a temporary folder, which
/// [`cached_compile`] moves into place.
pub fn compiled_model(pkg: &Package, cache_dir: &Path) -> Result<PathBuf> {
    let package = pkg.path();
    cached_compile(cache_dir, &pkg.content_hash()?, || {
        // SAFETY: a plain Objective-C call with a valid file URL. The synchronous form is
        // deprecated in favour of a completion handler; compiling once, up front (off the main
        // thread: docs/swift.md), is what this cache is for.
        #[allow(deprecated)]
        let compiled = unsafe { MLModel::compileModelAtURL_error(&file_url(package)) }
            .map_err(|e| ns_error(&format!("Core ML cannot compile {}", package.display()), e))?;
        compiled.path().map(|p| PathBuf::from(p.to_string())).ok_or_else(|| Error::invalid("no compiled path"))
    })
}

/// One function of the package, loaded as its own `MLModel` (Core ML binds a model instance
/// to one function).
struct Function {
    model: Retained<MLModel>,
    /// The states it declares (KV caches, hybrid models' recurrent states), by name.
    states: Vec<String>,
    outputs: Vec<String>,
    /// Inputs that the output named `<input>Out` feeds on the next call (iOS 16/17 KV caches),
    /// with their shapes and element types: carried as Core ML returns them.
    carried: Vec<(String, Vec<usize>, MLMultiArrayDataType)>,
}

/// What predictions carry from one call to the next: the `MLState` of an iOS 18 package, or the
/// KV-cache arrays an iOS 16/17 package returned, fed back as they are (no conversion, no copy,
/// fp16 stays fp16).
#[derive(Default)]
pub struct CoreMlState {
    state: Option<Retained<MLState>>,
    carried: Vec<(String, Retained<MLMultiArray>)>,
}

/// Runs a package's functions on Core ML.
pub struct CoreMlExecutor {
    functions: BTreeMap<String, Function>,
    default: String,
}

impl CoreMlExecutor {
    /// Compiles `pkg` (once) and loads each of its functions with `units`.
    pub fn open(pkg: &Package, units: ComputeUnits, cache_dir: &Path) -> Result<CoreMlExecutor> {
        let compiled = compiled_model(pkg, cache_dir)?;
        let description = &pkg.model().description;
        let mut functions = BTreeMap::new();
        for f in &description.functions {
            // SAFETY: plain Objective-C calls on objects we own.
            let model = unsafe {
                let config = MLModelConfiguration::new();
                config.setComputeUnits(units.to_ml());
                // Only multifunction packages (iOS 18, where `functionName` exists) name the
                // function to load; a single-function package loads its one function. On an
                // older OS the selector is missing: an error, not an unrecognized-selector abort.
                if description.is_multifunction() {
                    require(&*config, sel!(setFunctionName:), "multifunction packages")?;
                    config.setFunctionName(Some(&NSString::from_str(&f.name)));
                }
                MLModel::modelWithContentsOfURL_configuration_error(&file_url(&compiled), &config).map_err(|e| {
                    ns_error(&format!("Core ML cannot load function `{}` of {}", f.name, compiled.display()), e)
                })?
            };
            let outputs: Vec<String> = f.outputs.iter().map(|o| o.name.clone()).collect();
            let mut carried = Vec::new();
            for input in &f.inputs {
                let (Some(array), true) = (input.array(), outputs.contains(&names::carried_output(&input.name))) else {
                    continue;
                };
                let dtype = match array.dtype {
                    Some(DType::Fp16) => MLMultiArrayDataType::Float16,
                    Some(DType::Fp32) => MLMultiArrayDataType::Float32,
                    _ => return Err(Error::invalid(format!("input `{}`: a cache corelm does not carry", input.name))),
                };
                carried.push((input.name.clone(), array.shape.clone(), dtype));
            }
            let states = f.states.iter().map(|s| s.name.clone()).collect();
            functions.insert(f.name.clone(), Function { model, states, outputs, carried });
        }
        let default = description
            .default_function
            .clone()
            .or_else(|| description.functions.first().map(|f| f.name.clone()))
            .ok_or_else(|| Error::invalid("the package has no functions"))?;
        Ok(CoreMlExecutor { functions, default })
    }

    fn function(&self, name: Option<&str>) -> Result<&Function> {
        let name = name.unwrap_or(&self.default);
        self.functions.get(name).ok_or_else(|| Error::invalid(format!("the package has no function `{name}`")))
    }
}

impl Executor for CoreMlExecutor {
    /// `None` for functions without states (iOS 16/17 packages, where `MLState` does not exist).
    type State = CoreMlState;

    /// The functions of a fixed-length package declare the same states, so the state one
    /// function's model makes serves them all: predictions with every function read and write
    /// the one KV cache (as ANEMLL's Core ML runtime shares its prefill function's state with its
    /// decode function).
    fn new_state(&self, function: Option<&str>) -> Result<CoreMlState> {
        let f = self.function(function)?;
        let mut carried = Vec::with_capacity(f.carried.len());
        for (name, shape, dtype) in &f.carried {
            let zeros = if *dtype == MLMultiArrayDataType::Float16 {
                multi_array(shape, *dtype, |a: &mut [f16]| a.fill(f16::ZERO))?
            } else {
                multi_array(shape, *dtype, |a: &mut [f32]| a.fill(0.0))?
            };
            carried.push((name.clone(), zeros));
        }
        if f.states.is_empty() {
            return Ok(CoreMlState { state: None, carried });
        }
        require(&*f.model, sel!(newState), "stateful packages")?;
        // SAFETY: a plain Objective-C call, which the model was just found to answer.
        Ok(CoreMlState { state: Some(unsafe { f.model.newState() }), carried })
    }

    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, state: &mut Self::State) -> Result<Tensors> {
        self.predict_rows(function, inputs, state, None)
    }

    /// A fresh state with every buffer of `state` copied in (through `MLState`'s buffer access,
    /// macOS 15 / iOS 18); carried arrays are shared, since each prediction replaces rather than
    /// writes them. The functions of a package share one state layout, so the default function's
    /// model makes the copy.
    fn copy_state(&self, state: &CoreMlState) -> Result<CoreMlState> {
        let mut copy = self.new_state(None)?;
        copy.carried = state.carried.clone();
        if let (Some(from), Some(to)) = (&state.state, &copy.state) {
            require(&**from, sel!(getMultiArrayForStateNamed:handler:), "copying states")?;
            for name in &self.function(None)?.states {
                // SAFETY: both states come from models of one package, so each named buffer has
                // the same shape, type and length in both.
                unsafe { copy_state_buffer(from, to, name)? };
            }
        }
        Ok(copy)
    }

    /// Reads only query position `row` of the logits: of a prefill's N×V logits (V = 262k for
    /// Gemma), one row is converted, not N.
    fn predict_row(
        &mut self,
        function: Option<&str>,
        inputs: &Tensors,
        state: &mut Self::State,
        row: usize,
    ) -> Result<Tensors> {
        self.predict_rows(function, inputs, state, Some(row))
    }
}

/// The bytes of state `name` of `from`, written into the same state of `to`.
///
/// # Safety
/// `from` and `to` must be states of one model's layout, both declaring `name`.
unsafe fn copy_state_buffer(from: &MLState, to: &MLState, name: &str) -> Result<()> {
    let name_ns = NSString::from_str(name);
    let bytes = std::cell::RefCell::new(Vec::<u8>::new());
    let read = block2::StackBlock::new(|array: NonNull<MLMultiArray>| {
        let copy = block2::StackBlock::new(|ptr: NonNull<c_void>, len: isize| {
            // SAFETY: Core ML hands over `len` readable bytes for the handler's duration.
            let src = unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), len.max(0) as usize) };
            bytes.borrow_mut().extend_from_slice(src);
        });
        // SAFETY: the array is valid for the handler's duration.
        unsafe { array.as_ref().getBytesWithHandler(&copy) };
    });
    from.getMultiArrayForStateNamed_handler(&name_ns, &read);
    let written = std::cell::Cell::new(false);
    let write = block2::StackBlock::new(|array: NonNull<MLMultiArray>| {
        let copy = block2::StackBlock::new(|ptr: NonNull<c_void>, len: isize, _strides| {
            let src = bytes.borrow();
            if len.max(0) as usize == src.len() {
                // SAFETY: `len` writable bytes at `ptr`, exclusively ours for the handler's duration.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr().cast::<u8>(), src.len()) };
                written.set(true);
            }
        });
        // SAFETY: the array is valid for the handler's duration.
        unsafe { array.as_ref().getMutableBytesWithHandler(&copy) };
    });
    to.getMultiArrayForStateNamed_handler(&name_ns, &write);
    if !written.get() {
        return Err(Error::invalid(format!("state `{name}`: the copy's buffer differs in size from the original's")));
    }
    Ok(())
}

/// Fails, naming `what`, unless `object` answers `selector`: newer Core ML calls are checked
/// before they are made, so an older OS gives an error instead of aborting the app.
fn require(object: &(impl NSObjectProtocol + objc2::Message), selector: Sel, what: &str) -> Result<()> {
    if object.respondsToSelector(selector) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "this OS's Core ML has no `{}`: {what} need iOS 18 / macOS 15 or later",
            selector.name().to_string_lossy()
        )))
    }
}

impl CoreMlExecutor {
    /// One prediction; with `row`, only that query position of the logits outputs is read.
    fn predict_rows(
        &self,
        function: Option<&str>,
        inputs: &Tensors,
        state: &mut CoreMlState,
        row: Option<usize>,
    ) -> Result<Tensors> {
        let f = self.function(function)?;
        if state.carried.len() != f.carried.len() {
            return Err(Error::invalid("the state was made for another function"));
        }
        // A pool per prediction, so Core ML's autoreleased temporaries do not pile up over a
        // long generation on a thread without one.
        autoreleasepool(|_| {
            let provider = feature_provider(inputs, &state.carried)?;
            let provider = ProtocolObject::<dyn MLFeatureProvider>::from_ref(&*provider);
            // SAFETY: plain Objective-C calls on objects we own; the state came from `new_state`.
            let out = unsafe {
                match state.state.as_deref() {
                    Some(state) => f.model.predictionFromFeatures_usingState_error(provider, state),
                    None => f.model.predictionFromFeatures_error(provider),
                }
            }
            .map_err(|e| ns_error("Core ML prediction failed", e))?;
            // The carried caches: the returned arrays themselves, kept for the next call.
            for (input, array) in &mut state.carried {
                // SAFETY: plain Objective-C calls on the prediction's result.
                let output = names::carried_output(input);
                *array = unsafe { out.featureValueForName(&NSString::from_str(&output)) }
                    .and_then(|v| unsafe { v.multiArrayValue() })
                    .ok_or_else(|| Error::invalid(format!("the model returned no `{output}` array")))?;
            }
            let mut tensors = Tensors::new();
            for name in f.outputs.iter().filter(|o| !f.carried.iter().any(|(i, ..)| **o == names::carried_output(i))) {
                // SAFETY: plain Objective-C calls; the array is read within its shape and strides.
                let tensor = unsafe {
                    let array = out
                        .featureValueForName(&NSString::from_str(name))
                        .and_then(|v| v.multiArrayValue())
                        .ok_or_else(|| Error::invalid(format!("the model returned no `{name}` array")))?;
                    tensor_from_array(name, &array, row.filter(|_| names::is_logits(name)))?
                };
                tensors.insert(name.clone(), tensor);
            }
            Ok(tensors)
        })
    }
}

fn shape_array(shape: &[usize]) -> Retained<NSArray<NSNumber>> {
    let numbers: Vec<Retained<NSNumber>> = shape.iter().map(|&d| NSNumber::numberWithInteger(d as isize)).collect();
    NSArray::from_retained_slice(&numbers)
}

/// A new multi-array whose elements `fill` writes.
fn multi_array<T>(
    shape: &[usize],
    dtype: MLMultiArrayDataType,
    fill: impl FnOnce(&mut [T]),
) -> Result<Retained<MLMultiArray>> {
    let count: usize = shape.iter().product();
    let fill = std::cell::Cell::new(Some(fill));
    let filled = std::cell::Cell::new(false);
    // SAFETY: an array made with initWithShape:dataType:error: is contiguous and row-major
    // (MLMultiArray.h: "The scalars will use the first-major contiguous layout"), holding
    // `count` elements of `dtype`, whose size is `T`'s; the handler runs before
    // getMutableBytesWithHandler returns, with exclusive access to the buffer.
    unsafe {
        let array = MLMultiArray::initWithShape_dataType_error(MLMultiArray::alloc(), &shape_array(shape), dtype)
            .map_err(|e| ns_error("cannot allocate an MLMultiArray", e))?;
        let handler = block2::StackBlock::new(|ptr: NonNull<c_void>, bytes: isize, _strides| {
            if let Some(fill) = fill.take() {
                if bytes as usize >= count * std::mem::size_of::<T>() {
                    fill(std::slice::from_raw_parts_mut(ptr.cast::<T>().as_ptr(), count));
                    filled.set(true);
                }
            }
        });
        array.getMutableBytesWithHandler(&handler);
        if !filled.get() {
            return Err(Error::invalid(format!("Core ML gave a buffer too small for an array of shape {shape:?}")));
        }
        Ok(array)
    }
}

fn array_from_tensor(name: &str, t: &HostTensor) -> Result<Retained<MLMultiArray>> {
    match (&t.data, t.dtype) {
        (HostData::I32(d), DType::Int32) => {
            multi_array(&t.shape, MLMultiArrayDataType::Int32, |a| a.copy_from_slice(d))
        }
        (HostData::F32(d), DType::Fp16) => {
            multi_array(&t.shape, MLMultiArrayDataType::Float16, |a: &mut [f16]| a.convert_from_f32_slice(d))
        }
        (HostData::F32(d), DType::Fp32) => {
            multi_array(&t.shape, MLMultiArrayDataType::Float32, |a| a.copy_from_slice(d))
        }
        _ => Err(Error::invalid(format!("input `{name}`: {} values do not go to Core ML", t.dtype))),
    }
}

/// Copies an output array, whatever its strides (Core ML may pad them), into a tensor; with
/// `row`, only that index of its second-to-last axis ([`strided::gather`]). Read through
/// getBytesWithHandler, which gives the buffer Core ML may share with the device once it is
/// synchronized, and its length, which bounds every read.
///
/// # Safety
/// `array` must be a valid multi-array.
unsafe fn tensor_from_array(name: &str, array: &MLMultiArray, row: Option<usize>) -> Result<HostTensor> {
    let shape: Vec<usize> = array.shape().iter().map(|d| d.integerValue() as usize).collect();
    let strides: Vec<usize> = array.strides().iter().map(|d| d.integerValue() as usize).collect();
    let dtype = array.dataType();
    let result = std::cell::RefCell::new(None);
    let handler = block2::StackBlock::new(|ptr: NonNull<c_void>, bytes: isize| {
        let bytes = bytes.max(0) as usize;
        // SAFETY: Core ML hands over `bytes` readable bytes at `ptr` for the handler's duration.
        let read = |size: usize| unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), bytes / size * size) };
        let value = if dtype == MLMultiArrayDataType::Float16 {
            elements::<f16>(read(2)).and_then(|data| {
                strided::gather(data, &shape, &strides, row, f16::to_f32)
                    .map(|(s, d)| (DType::Fp16, s, HostData::F32(d)))
            })
        } else if dtype == MLMultiArrayDataType::Float32 {
            elements::<f32>(read(4)).and_then(|data| {
                strided::gather(data, &shape, &strides, row, |x| x).map(|(s, d)| (DType::Fp32, s, HostData::F32(d)))
            })
        } else if dtype == MLMultiArrayDataType::Int32 {
            elements::<i32>(read(4)).and_then(|data| {
                strided::gather(data, &shape, &strides, row, |x| x).map(|(s, d)| (DType::Int32, s, HostData::I32(d)))
            })
        } else {
            Err(Error::invalid(format!("output `{name}` has an array type corelm does not read")))
        };
        *result.borrow_mut() = Some(value);
    });
    array.getBytesWithHandler(&handler);
    let (dtype, shape, data) =
        result.into_inner().ok_or_else(|| Error::invalid(format!("Core ML gave no buffer for output `{name}`")))??;
    Ok(HostTensor { dtype, shape, data })
}

/// Views bytes as elements of `T`, a plain 2- or 4-byte number (Core ML aligns its buffers for
/// their element type; one that is not is an error).
fn elements<T>(bytes: &[u8]) -> Result<&[T]> {
    if !bytes.as_ptr().cast::<T>().is_aligned() {
        return Err(Error::invalid("Core ML returned a misaligned buffer"));
    }
    // SAFETY: aligned (checked), `len / size` whole elements of a plain number type.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / std::mem::size_of::<T>()) })
}

/// The inputs as Core ML features.
fn feature_provider(
    inputs: &Tensors,
    carried: &[(String, Retained<MLMultiArray>)],
) -> Result<Retained<MLDictionaryFeatureProvider>> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (name, array) in carried {
        keys.push(NSString::from_str(name));
        // SAFETY: a plain Objective-C call with an array we hold.
        values.push(unsafe { MLFeatureValue::featureValueWithMultiArray(array) });
    }
    for (name, tensor) in inputs {
        keys.push(NSString::from_str(name));
        let array = array_from_tensor(name, tensor)?;
        // SAFETY: a plain Objective-C call with an array we own.
        values.push(unsafe { MLFeatureValue::featureValueWithMultiArray(&array) });
    }
    let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
    let value_refs: Vec<&AnyObject> = values.iter().map(|v| v.as_ref() as &AnyObject).collect();
    let dict = NSDictionary::from_slices(&key_refs, &value_refs);
    // SAFETY: a plain Objective-C call; the dictionary maps names to feature values.
    unsafe { MLDictionaryFeatureProvider::initWithDictionary_error(MLDictionaryFeatureProvider::alloc(), &dict) }
        .map_err(|e| ns_error("cannot build the model inputs", e))
}
