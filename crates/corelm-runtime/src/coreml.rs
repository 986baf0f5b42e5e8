//! The Core ML backend (Apple platforms): compiles the `.mlpackage` once, caches the compiled
//! model under a content hash, loads each of its functions with the chosen compute units, and
//! runs predictions for [`LanguageModel`](corelm_interp::lm::LanguageModel), which drives every
//! interface corelm writes exactly as it drives the reference interpreter. Tensors cross as
//! `MLMultiArray`s (int32, fp16, fp32); KV caches live in one `MLState` (iOS 18 packages) or
//! are passed in and out like any other tensor (iOS 16/17 packages).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use corelm_format::{DType, Package};
use corelm_interp::lm::Executor;
use corelm_interp::value::{Data, Value};
use half::f16;
use half::slice::HalfFloatSliceExt;
use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::AnyThread;
use objc2_core_ml::{
    MLComputeUnits, MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLModel, MLModelConfiguration,
    MLMultiArray, MLMultiArrayDataType, MLState,
};
use objc2_foundation::{NSArray, NSDictionary, NSError, NSNumber, NSString, NSURL};

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
/// ([`Package::content_hash`]).
pub fn compiled_model(pkg: &Package, cache_dir: &Path) -> Result<PathBuf> {
    let package = pkg.path();
    let target = cache_dir.join(format!("{}.mlmodelc", pkg.content_hash()?));
    if target.is_dir() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    // SAFETY: a plain Objective-C call with a valid file URL. The synchronous form is deprecated
    // in favour of a completion handler; compiling once, up front, is what this cache is for.
    #[allow(deprecated)]
    let compiled = unsafe { MLModel::compileModelAtURL_error(&file_url(package)) }
        .map_err(|e| ns_error(&format!("Core ML cannot compile {}", package.display()), e))?;
    let from =
        compiled.path().map(|p| PathBuf::from(p.to_string())).ok_or_else(|| Error::invalid("no compiled path"))?;
    // Compile into a temporary name first so a half-copied model is never picked up.
    let partial = cache_dir.join(format!(".{}.partial", std::process::id()));
    copy_dir(&from, &partial)?;
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    Ok(target)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// One function of the package, loaded as its own `MLModel` (Core ML binds a model instance
/// to one function).
struct Function {
    model: Retained<MLModel>,
    stateful: bool,
    outputs: Vec<String>,
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
                // function to load; a single-function package loads its one function.
                if description.is_multifunction() {
                    config.setFunctionName(Some(&NSString::from_str(&f.name)));
                }
                MLModel::modelWithContentsOfURL_configuration_error(&file_url(&compiled), &config).map_err(|e| {
                    ns_error(&format!("Core ML cannot load function `{}` of {}", f.name, compiled.display()), e)
                })?
            };
            let outputs = f.outputs.iter().map(|o| o.name.clone()).collect();
            functions.insert(f.name.clone(), Function { model, stateful: !f.states.is_empty(), outputs });
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
    type State = Option<Retained<MLState>>;

    /// The functions of a fixed-length package declare the same states, so the state one
    /// function's model makes serves them all: predictions with every function read and write
    /// the one KV cache (as ANEMLL's Core ML runtime shares its prefill function's state with its
    /// decode function).
    fn new_state(&self, function: Option<&str>) -> Result<Self::State> {
        let f = self.function(function)?;
        // SAFETY: a plain Objective-C call on a model with states (so iOS 18 or later).
        Ok(f.stateful.then(|| unsafe { f.model.newState() }))
    }

    fn predict(
        &mut self,
        function: Option<&str>,
        inputs: &BTreeMap<String, Value>,
        state: &mut Self::State,
    ) -> Result<BTreeMap<String, Value>> {
        let f = self.function(function)?;
        // A pool per prediction, so Core ML's autoreleased temporaries do not pile up over a
        // long generation on a thread without one.
        autoreleasepool(|_| {
            let provider = feature_provider(inputs)?;
            let provider = ProtocolObject::<dyn MLFeatureProvider>::from_ref(&*provider);
            // SAFETY: plain Objective-C calls on objects we own; the state came from `new_state`.
            let out = unsafe {
                match state.as_deref() {
                    Some(state) => f.model.predictionFromFeatures_usingState_error(provider, state),
                    None => f.model.predictionFromFeatures_error(provider),
                }
            }
            .map_err(|e| ns_error("Core ML prediction failed", e))?;
            let mut values = BTreeMap::new();
            for name in &f.outputs {
                // SAFETY: plain Objective-C calls; the array is read within its shape and strides.
                let value = unsafe {
                    let array = out
                        .featureValueForName(&NSString::from_str(name))
                        .and_then(|v| v.multiArrayValue())
                        .ok_or_else(|| Error::invalid(format!("the model returned no `{name}` array")))?;
                    value_from_array(name, &array)?
                };
                values.insert(name.clone(), value);
            }
            Ok(values)
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
    // SAFETY: an array made with initWithShape:dataType:error: is contiguous and row-major
    // (MLMultiArray.h: "The scalars will use the first-major contiguous layout"), holding the
    // product of `shape` elements of `dtype`, whose size is `T`'s.
    unsafe {
        let array = MLMultiArray::initWithShape_dataType_error(MLMultiArray::alloc(), &shape_array(shape), dtype)
            .map_err(|e| ns_error("cannot allocate an MLMultiArray", e))?;
        #[allow(deprecated)]
        let ptr: NonNull<T> = array.dataPointer().cast();
        fill(std::slice::from_raw_parts_mut(ptr.as_ptr(), shape.iter().product()));
        Ok(array)
    }
}

fn array_from_value(name: &str, v: &Value) -> Result<Retained<MLMultiArray>> {
    match (&v.data, v.dtype) {
        (Data::I32(d), DType::Int32) => multi_array(&v.shape, MLMultiArrayDataType::Int32, |a| a.copy_from_slice(d)),
        (Data::F32(d), DType::Fp16) => {
            multi_array(&v.shape, MLMultiArrayDataType::Float16, |a: &mut [f16]| a.convert_from_f32_slice(d))
        }
        (Data::F32(d), DType::Fp32) => multi_array(&v.shape, MLMultiArrayDataType::Float32, |a| a.copy_from_slice(d)),
        _ => Err(Error::invalid(format!("input `{name}`: {} values do not go to Core ML", v.dtype))),
    }
}

/// The elements of a strided array in row-major order.
///
/// # Safety
/// `base` must point to an array of `shape` with element strides `strides`.
unsafe fn gather<T: Copy, U>(base: NonNull<T>, shape: &[usize], strides: &[usize], convert: impl Fn(T) -> U) -> Vec<U> {
    let mut out = Vec::with_capacity(shape.iter().product());
    if shape.contains(&0) {
        return out;
    }
    let (inner, inner_stride) = (shape.last().copied().unwrap_or(1), strides.last().copied().unwrap_or(1));
    // An odometer over every dimension but the last.
    let mut index = vec![0usize; shape.len()];
    loop {
        let offset: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
        out.extend((0..inner).map(|k| convert(base.as_ptr().add(offset + k * inner_stride).read())));
        let mut d = shape.len().saturating_sub(1);
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// Copies an output array, whatever its strides (Core ML may pad them), into a value.
///
/// # Safety
/// `array` must be a valid multi-array whose storage nobody writes meanwhile.
unsafe fn value_from_array(name: &str, array: &MLMultiArray) -> Result<Value> {
    let shape: Vec<usize> = array.shape().iter().map(|d| d.integerValue() as usize).collect();
    let strides: Vec<usize> = array.strides().iter().map(|d| d.integerValue() as usize).collect();
    #[allow(deprecated)]
    let base = array.dataPointer();
    let dtype = array.dataType();
    let (dtype, data) = if dtype == MLMultiArrayDataType::Float16 {
        (DType::Fp16, Data::F32(gather(base.cast::<f16>(), &shape, &strides, f16::to_f32)))
    } else if dtype == MLMultiArrayDataType::Float32 {
        (DType::Fp32, Data::F32(gather(base.cast::<f32>(), &shape, &strides, |x| x)))
    } else if dtype == MLMultiArrayDataType::Int32 {
        (DType::Int32, Data::I32(gather(base.cast::<i32>(), &shape, &strides, |x| x)))
    } else {
        return Err(Error::invalid(format!("output `{name}` has an array type corelm does not read")));
    };
    Ok(Value { dtype, shape, data })
}

/// The inputs as Core ML features.
fn feature_provider(inputs: &BTreeMap<String, Value>) -> Result<Retained<MLDictionaryFeatureProvider>> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (name, value) in inputs {
        keys.push(NSString::from_str(name));
        let array = array_from_value(name, value)?;
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
