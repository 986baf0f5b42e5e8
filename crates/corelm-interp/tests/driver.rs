//! The generation driver (`LanguageModel`) through an injected executor that counts the states
//! alive: what the Core ML backend, which cannot run here, relies on the driver doing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use corelm_contract::driver::{Executor, LanguageModel};
use corelm_contract::tensor::Tensors;
use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::GraphOptions;
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};
use corelm_interp::executor::CarriedState;
use corelm_interp::value::Value;
use corelm_interp::{Interpreter, Result};

/// States alive now, and the most ever alive at once.
#[derive(Default)]
struct Census {
    alive: AtomicUsize,
    peak: AtomicUsize,
}

/// An interpreter state that reports its life to the census (the default: no state at all).
#[derive(Default)]
struct Counted {
    state: CarriedState,
    census: Option<Arc<Census>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(c) = &self.census {
            c.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

struct Counting {
    interpreter: Interpreter,
    census: Arc<Census>,
}

impl Executor for Counting {
    type State = Counted;

    fn new_state(&self, function: Option<&str>) -> Result<Counted> {
        let state = Executor::new_state(&self.interpreter, function)?;
        let alive = self.census.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.census.peak.fetch_max(alive, Ordering::SeqCst);
        Ok(Counted { state, census: Some(self.census.clone()) })
    }

    fn predict(&mut self, function: Option<&str>, inputs: &Tensors, state: &mut Counted) -> Result<Tensors> {
        assert!(!inputs.contains_key("keyCache"), "the driver passed the caches the executor carries");
        Executor::predict(&mut self.interpreter, function, inputs, &mut state.state)
    }
}

fn package(dir: &Path, target: Target, query_lengths: Vec<usize>) -> Package {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/qwen3");
    let out = dir.join(format!("{target:?}-{}.mlpackage", query_lengths.len()));
    let opts = GraphOptions { target, context: 32, query_lengths, ..GraphOptions::default() };
    convert(&open_source(&src).unwrap(), &out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
    Package::open(&out).unwrap()
}

/// A reset drops each old state before making the new one, so a model's KV cache is never held
/// twice (for the stateful, fixed-length and KV-as-I/O interfaces), and what it leaves generates
/// exactly what a fresh model does.
#[test]
fn reset_never_holds_two_states() {
    let tmp = tempfile::tempdir().unwrap();
    for (target, lengths) in [(Target::Ios18, vec![]), (Target::Ios18, vec![1, 4]), (Target::Ios17, vec![])] {
        let pkg = package(tmp.path(), target, lengths.clone());
        let census = Arc::new(Census::default());
        let mut lm =
            LanguageModel::open(&pkg, |p| Ok(Counting { interpreter: Interpreter::load(p)?, census: census.clone() }))
                .unwrap();
        let fresh = lm.feed(&[5, 6, 7]).unwrap();
        for _ in 0..3 {
            lm.reset().unwrap();
            assert_eq!(lm.position(), 0);
            assert_eq!(lm.feed(&[5, 6, 7]).unwrap(), fresh, "{target:?} {lengths:?}");
        }
        assert_eq!(census.peak.load(Ordering::SeqCst), 1, "{target:?} {lengths:?}");
        drop(lm);
        assert_eq!(census.alive.load(Ordering::SeqCst), 0);
    }
}

/// The interpreter carries the iOS 16/17 KV caches itself: what the driver generates through it,
/// also after a reset, is what the package gives called by hand, each call's `keyCacheOut` fed
/// back as `keyCache` (likewise `valueCache`).
#[test]
fn the_interpreter_carries_the_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = package(tmp.path(), Target::Ios17, vec![]);
    let interpreter = Interpreter::load(&pkg).unwrap();
    let inputs = interpreter.inputs(None).unwrap();
    let input = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).unwrap();
    let (cache, mask_dtype) = (input("keyCache"), input("causalMask").dtype);
    let zeros = || Value::zeros(cache.dtype, cache.shape().unwrap(), &"a cache").unwrap();
    let (mut key, mut value) = (zeros(), zeros());
    let mut by_hand: Vec<Vec<f32>> = Vec::new();
    let mut position = 0;
    for ids in [&[5, 6, 7][..], &[9]] {
        let (n, width) = (ids.len(), position + ids.len());
        let mask = (0..n * width).map(|k| if k % width <= position + k / width { 0.0 } else { f32::NEG_INFINITY });
        let inputs = BTreeMap::from([
            ("inputIds".to_string(), Value::i32(vec![1, n], ids.to_vec())),
            ("causalMask".to_string(), Value::f32(mask_dtype, vec![1, 1, n, width], mask.collect())),
            ("keyCache".to_string(), key),
            ("valueCache".to_string(), value),
        ]);
        let mut out = interpreter.predict(None, &inputs, &mut interpreter.new_state(None).unwrap()).unwrap();
        (key, value) = (out.remove("keyCacheOut").unwrap(), out.remove("valueCacheOut").unwrap());
        let vocab = *out["logits"].shape.last().unwrap();
        by_hand.extend(out["logits"].as_f32().unwrap().chunks(vocab).map(<[f32]>::to_vec));
        position += n;
    }
    let mut lm = LanguageModel::open(&pkg, Interpreter::load).unwrap();
    for round in 0..2 {
        let got: Vec<Vec<f32>> = [lm.feed(&[5, 6, 7]).unwrap(), lm.feed(&[9]).unwrap()].concat();
        assert_eq!(got, by_hand, "round {round}");
        lm.reset().unwrap();
    }
}
