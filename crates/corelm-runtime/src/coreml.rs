//! The Core ML backend (Apple platforms): compiles the `.mlpackage` once, caches the compiled
//! model under a content hash, loads it with the chosen compute units, keeps the KV cache in an
//! `MLState`, and exchanges `MLMultiArray`s with the model.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use objc2::rc::Retained;
use objc2::runtime::{AnyObject, ProtocolObject};
use objc2::AnyThread;
use objc2_core_ml::{
    MLComputeUnits, MLDictionaryFeatureProvider, MLFeatureProvider, MLFeatureValue, MLModel, MLModelConfiguration,
    MLMultiArray, MLMultiArrayDataType, MLState,
};
use objc2_foundation::{NSArray, NSDictionary, NSError, NSNumber, NSString, NSURL};
use sha2::{Digest, Sha256};

use crate::generate::Backend;
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

/// A hash of what defines the compiled model: the model spec, the manifest, and each weight
/// file's name and size (hashing gigabytes of weights on every launch would cost more than the
/// compilation it saves).
fn content_hash(package: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for rel in ["Manifest.json", "Data/com.apple.CoreML/model.mlmodel"] {
        let p = package.join(rel);
        h.update(std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
    }
    let weights = package.join("Data/com.apple.CoreML/weights");
    if let Ok(entries) = std::fs::read_dir(&weights) {
        let mut files: Vec<(String, u64)> = entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect();
        files.sort();
        for (name, len) in files {
            h.update(name.as_bytes());
            h.update(len.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compiles `package` into `cache_dir/<hash>.mlmodelc` unless it is there already.
pub fn compiled_model(package: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let target = cache_dir.join(format!("{}.mlmodelc", content_hash(package)?));
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

pub struct CoreMlBackend {
    model: Retained<MLModel>,
    state: Retained<MLState>,
    context: usize,
    position: usize,
}

fn shape_array(shape: &[usize]) -> Retained<NSArray<NSNumber>> {
    let numbers: Vec<Retained<NSNumber>> = shape.iter().map(|&d| NSNumber::numberWithInteger(d as isize)).collect();
    NSArray::from_retained_slice(&numbers)
}

/// A new multi-array filled from `fill`, which receives the contiguous buffer.
fn multi_array<T: Copy>(shape: &[usize], dtype: MLMultiArrayDataType, values: &[T]) -> Result<Retained<MLMultiArray>> {
    // SAFETY: a fresh array of this shape and dtype is contiguous, row-major, and holds exactly
    // `values.len()` elements of `T`'s size.
    unsafe {
        let array = MLMultiArray::initWithShape_dataType_error(MLMultiArray::alloc(), &shape_array(shape), dtype)
            .map_err(|e| ns_error("cannot allocate an MLMultiArray", e))?;
        #[allow(deprecated)]
        let ptr: NonNull<T> = array.dataPointer().cast();
        std::ptr::copy_nonoverlapping(values.as_ptr(), ptr.as_ptr(), values.len());
        Ok(array)
    }
}

impl CoreMlBackend {
    /// Compiles (once), loads and prepares a stateful package.
    pub fn open(package: &Path, units: ComputeUnits, cache_dir: &Path, context: usize) -> Result<CoreMlBackend> {
        let compiled = compiled_model(package, cache_dir)?;
        // SAFETY: plain Objective-C calls on objects we own.
        unsafe {
            let config = MLModelConfiguration::new();
            config.setComputeUnits(units.to_ml());
            let model = MLModel::modelWithContentsOfURL_configuration_error(&file_url(&compiled), &config)
                .map_err(|e| ns_error(&format!("Core ML cannot load {}", compiled.display()), e))?;
            let state = model.newState();
            Ok(CoreMlBackend { model, state, context, position: 0 })
        }
    }
}

impl Backend for CoreMlBackend {
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let n = ids.len();
        let end = self.position + n;
        if end > self.context {
            return Err(Error::invalid(format!("{end} tokens exceed the context of {}", self.context)));
        }
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let mut mask = vec![half::f16::NEG_INFINITY; n * end];
        for i in 0..n {
            for j in 0..=self.position + i {
                mask[i * end + j] = half::f16::ZERO;
            }
        }
        let ids = multi_array(&[1, n], MLMultiArrayDataType::Int32, &ids)?;
        let mask = multi_array(&[1, 1, n, end], MLMultiArrayDataType::Float16, &mask)?;
        // SAFETY: plain Objective-C calls on objects we own; the output array is read within
        // its bounds as reported by its shape and strides.
        unsafe {
            let keys = [NSString::from_str("inputIds"), NSString::from_str("causalMask")];
            let values =
                [MLFeatureValue::featureValueWithMultiArray(&ids), MLFeatureValue::featureValueWithMultiArray(&mask)];
            let key_refs: Vec<&NSString> = keys.iter().map(|k| &**k).collect();
            let value_refs: Vec<&AnyObject> = values.iter().map(|v| v.as_ref() as &AnyObject).collect();
            let dict = NSDictionary::from_slices(&key_refs, &value_refs);
            let provider =
                MLDictionaryFeatureProvider::initWithDictionary_error(MLDictionaryFeatureProvider::alloc(), &dict)
                    .map_err(|e| ns_error("cannot build the model inputs", e))?;
            let provider = ProtocolObject::<dyn MLFeatureProvider>::from_ref(&*provider);
            let out = self
                .model
                .predictionFromFeatures_usingState_error(provider, &self.state)
                .map_err(|e| ns_error("Core ML prediction failed", e))?;
            let logits = out
                .featureValueForName(&NSString::from_str("logits"))
                .and_then(|v| v.multiArrayValue())
                .ok_or_else(|| Error::invalid("the model returned no `logits` array"))?;
            let shape: Vec<usize> = logits.shape().iter().map(|d| d.integerValue() as usize).collect();
            let strides: Vec<usize> = logits.strides().iter().map(|d| d.integerValue() as usize).collect();
            let (rows, vocab) = (shape[1], shape[2]);
            #[allow(deprecated)]
            let base = logits.dataPointer();
            let fp16 = logits.dataType() == MLMultiArrayDataType::Float16;
            let mut result = vec![vec![0f32; vocab]; rows];
            for (r, row) in result.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    let at = r * strides[1] + v * strides[2];
                    *x = if fp16 {
                        base.cast::<half::f16>().as_ptr().add(at).read().to_f32()
                    } else {
                        base.cast::<f32>().as_ptr().add(at).read()
                    };
                }
            }
            self.position = end;
            Ok(result)
        }
    }

    fn reset(&mut self) -> Result<()> {
        // SAFETY: a plain Objective-C call.
        self.state = unsafe { self.model.newState() };
        self.position = 0;
        Ok(())
    }

    fn context(&self) -> usize {
        self.context
    }

    fn position(&self) -> usize {
        self.position
    }
}
