//! The generation driver (`LanguageModel`) through an injected executor that counts the states
//! alive: what the Core ML backend, which cannot run here, relies on the driver doing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::GraphOptions;
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};
use corelm_interp::lm::{Executor, LanguageModel};
use corelm_interp::value::Value;
use corelm_interp::{Interpreter, Result, State};

/// States alive now, and the most ever alive at once.
#[derive(Default)]
struct Census {
    alive: AtomicUsize,
    peak: AtomicUsize,
}

/// An interpreter state that reports its life to the census (the default: no state at all).
#[derive(Default)]
struct Counted {
    state: State,
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
        let state = self.interpreter.new_state(function)?;
        let alive = self.census.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.census.peak.fetch_max(alive, Ordering::SeqCst);
        Ok(Counted { state, census: Some(self.census.clone()) })
    }

    fn predict(
        &mut self,
        function: Option<&str>,
        inputs: &BTreeMap<String, Value>,
        state: &mut Counted,
    ) -> Result<BTreeMap<String, Value>> {
        self.interpreter.predict(function, inputs, &mut state.state)
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
        let mut lm = LanguageModel::open_with(&pkg, |p| {
            Ok(Counting { interpreter: Interpreter::load(p)?, census: census.clone() })
        })
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

/// An interpreter that carries the iOS 16/17 KV caches in its own state, as the Core ML backend
/// carries its returned arrays.
struct Carrying {
    interpreter: Interpreter,
    /// The most recent `keyCacheOut` / `valueCacheOut`, fed back as `keyCache` / `valueCache`.
    fresh: BTreeMap<String, Value>,
}

impl Executor for Carrying {
    type State = BTreeMap<String, Value>;

    fn new_state(&self, _: Option<&str>) -> Result<BTreeMap<String, Value>> {
        Ok(self.fresh.clone())
    }

    fn carries_caches(&self) -> bool {
        true
    }

    fn predict(
        &mut self,
        function: Option<&str>,
        inputs: &BTreeMap<String, Value>,
        state: &mut BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>> {
        assert!(!inputs.contains_key("keyCache"), "the driver passed the caches an executor carries");
        let mut all = inputs.clone();
        all.extend(state.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut out = self.interpreter.predict(function, &all, &mut State::default())?;
        for name in ["keyCache", "valueCache"] {
            state.insert(name.into(), out.remove(&format!("{name}Out")).expect("cache output"));
        }
        Ok(out)
    }
}

/// With an executor that carries the KV caches itself, the driver passes none and reads none,
/// and generation (prefill, decode, reset) matches the driver carrying them.
#[test]
fn an_executor_may_carry_the_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = package(tmp.path(), Target::Ios17, vec![]);
    let mut reference = LanguageModel::open(&pkg).unwrap();
    let interpreter = Interpreter::load(&pkg).unwrap();
    let shape: Vec<usize> = interpreter
        .inputs(None)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "keyCache")
        .and_then(|(_, t)| t.shape())
        .unwrap();
    let zeros = || Value::f32(corelm_format::DType::Fp16, shape.clone(), vec![0.0; shape.iter().product()]);
    let fresh = BTreeMap::from([("keyCache".to_string(), zeros()), ("valueCache".to_string(), zeros())]);
    let mut carried = LanguageModel::with_executor(&pkg, Carrying { interpreter, fresh }).unwrap();
    for lm_round in 0..2 {
        let want: Vec<Vec<f32>> = [reference.feed(&[5, 6, 7]).unwrap(), reference.feed(&[9]).unwrap()].concat();
        let got: Vec<Vec<f32>> = [carried.feed(&[5, 6, 7]).unwrap(), carried.feed(&[9]).unwrap()].concat();
        assert_eq!(got, want, "round {lm_round}");
        reference.reset().unwrap();
        carried.reset().unwrap();
    }
}
