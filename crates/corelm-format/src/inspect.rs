//! A summary of a package for people (`Display`) and scripts (`serde_json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::ane::{self, Finding, RULES};
use crate::error::Result;
use crate::mil::program::Function;
use crate::mil::program::ValueData;
use crate::mil::types::TensorType;
use crate::mil::validate::{blob_values, output_types_at};
use crate::model::{Feature, FeatureKind, Flexibility, FunctionDescription};
use crate::package::Package;
use crate::target::Target;
use crate::tensor::{element_count, storage_bytes};

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub spec_version: i32,
    pub target: Option<String>,
    pub os: Option<String>,
    pub multifunction: bool,
    pub default_function: Option<String>,
    pub functions: BTreeMap<String, FunctionReport>,
    pub metadata: MetadataReport,
    pub build_info: BTreeMap<String, String>,
    pub weights: WeightsReport,
    /// Problems our validator finds; empty for a valid package.
    pub issues: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct FunctionReport {
    pub opset: String,
    pub inputs: Vec<FeatureReport>,
    pub outputs: Vec<FeatureReport>,
    pub states: Vec<FeatureReport>,
    pub op_count: usize,
    pub op_histogram: BTreeMap<String, usize>,
    /// Ops, inputs, states and weight files known to keep Core ML off the Neural Engine
    /// (`docs/ane-rules.md`); empty when none is known.
    pub ane_fallbacks: Vec<Finding>,
}

#[derive(Debug, Serialize)]
pub struct FeatureReport {
    pub name: String,
    /// `fp16`, `fp32`, `int32`, ...; the kind's name for non-array features.
    pub dtype: String,
    /// Default shape; empty when only known at run time.
    pub shape: Vec<usize>,
    pub flexibility: Option<FlexibilityReport>,
    /// Where the description declares no shape (flexible outputs): the shape the program's types
    /// give at the inputs' smallest and largest shapes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_program: Option<ProgramShape>,
}

#[derive(Debug, Serialize)]
pub struct ProgramShape {
    /// At the inputs' smallest shapes.
    pub shape: Vec<usize>,
    pub flexibility: Option<FlexibilityReport>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FlexibilityReport {
    /// Per dimension `[lower, upper]`, upper `null` when unbounded.
    Range {
        ranges: Vec<(usize, Option<usize>)>,
    },
    Enumerated {
        shapes: Vec<Vec<usize>>,
    },
}

#[derive(Debug, Serialize)]
pub struct MetadataReport {
    pub short_description: String,
    pub version: String,
    pub author: String,
    pub license: String,
    pub user_defined: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct WeightsReport {
    /// Bytes of distinct blobs the program references, by dtype.
    pub bytes_by_dtype: BTreeMap<String, u64>,
    pub total_bytes: u64,
    pub files: Vec<WeightFile>,
}

#[derive(Debug, Serialize)]
pub struct WeightFile {
    pub path: String,
    pub bytes: u64,
}

fn feature_report(f: &Feature) -> FeatureReport {
    match &f.kind {
        FeatureKind::Array(a) | FeatureKind::State(a) => FeatureReport {
            name: f.name.clone(),
            dtype: a.dtype.map_or("unknown".into(), |d| d.name().into()),
            shape: a.shape.clone(),
            from_program: None,
            flexibility: match &a.flexibility {
                Flexibility::Fixed => None,
                Flexibility::Range(r) => Some(FlexibilityReport::Range { ranges: r.clone() }),
                Flexibility::Enumerated(s) => Some(FlexibilityReport::Enumerated { shapes: s.clone() }),
            },
        },
        FeatureKind::Other(kind) => FeatureReport {
            name: f.name.clone(),
            dtype: (*kind).into(),
            shape: vec![],
            flexibility: None,
            from_program: None,
        },
    }
}

impl Report {
    pub fn new(package: &Package) -> Result<Report> {
        let model = package.model();
        let target = Target::from_spec_version(model.spec_version);
        let mut functions = BTreeMap::new();
        let mut seen_blobs = BTreeSet::new();
        let mut bytes_by_dtype: BTreeMap<String, u64> = BTreeMap::new();
        let mut ane_fallbacks = ane::findings(package);
        for (name, f) in &model.program.functions {
            let mut op_histogram = BTreeMap::new();
            for op in &f.block.operations {
                *op_histogram.entry(op.op_type.clone()).or_insert(0) += 1;
            }
            for (_, value) in blob_values(f) {
                if let ValueData::Blob { file, offset } = &value.data {
                    if seen_blobs.insert((file.clone(), *offset)) {
                        let count = value.ty.shape().and_then(|s| element_count(&s)).unwrap_or(0);
                        let bytes = storage_bytes(value.ty.dtype, count).unwrap_or(0) as u64;
                        *bytes_by_dtype.entry(value.ty.dtype.name().into()).or_insert(0) += bytes;
                    }
                }
            }
            let described = model.description.function(name);
            let features = |pick: fn(&crate::model::FunctionDescription) -> &Vec<Feature>| {
                described.map(|d| pick(d).iter().map(feature_report).collect()).unwrap_or_default()
            };
            let mut outputs: Vec<FeatureReport> = features(|d| &d.outputs);
            if let (Some(d), Some(t)) = (described, target) {
                shapes_from_program(f, t, d, &mut outputs);
            }
            functions.insert(
                name.clone(),
                FunctionReport {
                    opset: f.opset.clone(),
                    inputs: features(|d| &d.inputs),
                    outputs,
                    states: features(|d| &d.states),
                    op_count: f.block.operations.len(),
                    op_histogram,
                    ane_fallbacks: ane_fallbacks.remove(name).unwrap_or_default(),
                },
            );
        }
        let md = &model.description.metadata;
        let files: Vec<WeightFile> =
            package.weight_files()?.into_iter().map(|(path, bytes)| WeightFile { path, bytes }).collect();
        Ok(Report {
            path: package.path().display().to_string(),
            spec_version: model.spec_version,
            target: target.map(|t| t.mil_name().into()),
            os: target.map(|t| t.os_releases().into()),
            multifunction: model.description.is_multifunction(),
            default_function: model.description.default_function.clone(),
            functions,
            metadata: MetadataReport {
                short_description: md.short_description.clone(),
                version: md.version.clone(),
                author: md.author.clone(),
                license: md.license.clone(),
                user_defined: md.user_defined.clone(),
            },
            build_info: model.program.build_info.clone(),
            weights: WeightsReport { total_bytes: bytes_by_dtype.values().sum(), bytes_by_dtype, files },
            issues: package.validate().iter().map(|i| i.to_string()).collect(),
        })
    }
}

/// Fills in the shape of outputs the description leaves open (coremltools and corelm declare
/// flexible outputs without one), from the program: its types inferred with every flexible input
/// at the low and at the high end of its ranges. A dim that differs between the two is a range.
fn shapes_from_program(f: &Function, target: Target, d: &FunctionDescription, outputs: &mut [FeatureReport]) {
    if outputs.iter().all(|o| !o.shape.is_empty()) {
        return;
    }
    let at = |high: bool| -> Option<Vec<TensorType>> {
        let mut inputs = BTreeMap::new();
        for feature in &d.inputs {
            let a = feature.array()?;
            let shape = match (&a.flexibility, high) {
                (Flexibility::Range(r), false) => r.iter().map(|&(lo, _)| lo).collect(),
                // An unbounded range has no high end to show.
                (Flexibility::Range(r), true) => r.iter().map(|&(_, hi)| hi).collect::<Option<Vec<_>>>()?,
                _ => a.shape.clone(),
            };
            inputs.insert(feature.name.clone(), TensorType::fixed(a.dtype?, &shape));
        }
        Some(output_types_at(f, target, &inputs))
    };
    let (Some(low), high) = (at(false), at(true)) else { return };
    let declared = f.var_types();
    for (i, out) in outputs.iter_mut().enumerate().filter(|(_, o)| o.shape.is_empty()) {
        let Some(lo) = low.get(i).and_then(|t| t.shape()) else { continue };
        let hi = high.as_ref().and_then(|h| h.get(i)).and_then(|t| t.shape()).filter(|h| h.len() == lo.len());
        // Without a high end, a dim the program leaves open is unbounded; the others are fixed.
        let open = |k: usize| {
            f.block
                .outputs
                .get(i)
                .and_then(|n| declared.get(n.as_str()))
                .is_none_or(|t| t.tensor().dims.get(k).is_none_or(|d| d.fixed().is_none()))
        };
        let ranges: Vec<(usize, Option<usize>)> = match hi {
            Some(hi) => lo.iter().zip(&hi).map(|(&l, &h)| (l, Some(h))).collect(),
            None => lo.iter().enumerate().map(|(k, &l)| (l, if open(k) { None } else { Some(l) })).collect(),
        };
        let flexible = ranges.iter().any(|&(l, h)| h != Some(l));
        out.from_program =
            Some(ProgramShape { shape: lo, flexibility: flexible.then_some(FlexibilityReport::Range { ranges }) });
    }
}

/// Bytes for people, in binary units ("1.5 GiB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn feature_line(f: &FeatureReport) -> String {
    let (shape, flexibility, note) = match &f.from_program {
        Some(p) => (&p.shape, &p.flexibility, "  (from the program)"),
        None => (&f.shape, &f.flexibility, ""),
    };
    let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let flex = match flexibility {
        None => String::new(),
        Some(FlexibilityReport::Range { ranges }) => {
            let r: Vec<String> = ranges
                .iter()
                .map(|(lo, hi)| {
                    if Some(*lo) == *hi {
                        lo.to_string()
                    } else {
                        format!("{lo}..{}", hi.map_or("∞".into(), |h| h.to_string()))
                    }
                })
                .collect();
            format!("  range ({})", r.join(", "))
        }
        Some(FlexibilityReport::Enumerated { shapes }) => format!("  enumerated {shapes:?}"),
    };
    format!("{} {} [{}]{flex}{note}", f.name, f.dtype, shape.join(", "))
}

/// Subjects shown per rule; the count tells how many there are.
const SHOWN_SUBJECTS: usize = 3;

fn ane_lines(f: &mut fmt::Formatter<'_>, findings: &[Finding]) -> fmt::Result {
    if findings.is_empty() {
        return writeln!(f, "    Neural Engine: no known fallbacks");
    }
    writeln!(f, "    Neural Engine: known fallbacks (rules in docs/ane-rules.md)")?;
    for rule in RULES {
        let hits: Vec<&Finding> = findings.iter().filter(|h| h.rule == rule).collect();
        if hits.is_empty() {
            continue;
        }
        let shown: Vec<String> = hits.iter().take(SHOWN_SUBJECTS).map(|h| h.subject.to_string()).collect();
        let more = if hits.len() > SHOWN_SUBJECTS { ", …" } else { "" };
        writeln!(f, "      {rule} ×{}: {}{more}", hits.len(), shown.join(", "))?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.path)?;
        writeln!(
            f,
            "  specification {} ({}, {})",
            self.spec_version,
            self.target.as_deref().unwrap_or("unknown target"),
            self.os.as_deref().unwrap_or("unknown OS")
        )?;
        if let Some(d) = &self.default_function {
            writeln!(f, "  multifunction, default function `{d}`")?;
        }
        for (name, func) in &self.functions {
            writeln!(f, "  function {name} ({}, {} ops)", func.opset, func.op_count)?;
            for (label, list) in [("input", &func.inputs), ("state", &func.states), ("output", &func.outputs)] {
                for feature in list.iter() {
                    writeln!(f, "    {label:<6} {}", feature_line(feature))?;
                }
            }
            let ops: Vec<String> = func.op_histogram.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
            writeln!(f, "    ops    {}", ops.join(", "))?;
            ane_lines(f, &func.ane_fallbacks)?;
        }
        let md = &self.metadata;
        for (k, v) in [
            ("author", &md.author),
            ("version", &md.version),
            ("license", &md.license),
            ("description", &md.short_description),
        ] {
            if !v.is_empty() {
                writeln!(f, "  {k}: {v}")?;
            }
        }
        for (k, v) in &md.user_defined {
            let shown: String = v.chars().take(80).collect();
            writeln!(f, "  {k}: {shown}{}", if v.chars().count() > 80 { "…" } else { "" })?;
        }
        let by_dtype: Vec<String> =
            self.weights.bytes_by_dtype.iter().map(|(k, v)| format!("{k} {}", human_bytes(*v))).collect();
        writeln!(f, "  weights {} ({})", human_bytes(self.weights.total_bytes), by_dtype.join(", "))?;
        for file in &self.weights.files {
            writeln!(f, "    {} {}", file.path, human_bytes(file.bytes))?;
        }
        if self.issues.is_empty() {
            writeln!(f, "  valid")?;
        } else {
            writeln!(f, "  {} problem(s):", self.issues.len())?;
            for i in &self.issues {
                writeln!(f, "    {i}")?;
            }
        }
        Ok(())
    }
}
