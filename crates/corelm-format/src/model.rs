//! The model as a whole: specification version, description (inputs, outputs, states per
//! function, metadata) and the ML Program, with conversion to and from `Model.proto`.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::mil::program::Program;
use crate::mil::proto_io::{program_from_proto, program_to_proto};
use crate::proto;
use crate::target::Target;

/// How an input's shape may vary between predictions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flexibility {
    Fixed,
    /// Per dimension: inclusive lower bound, inclusive upper bound (`None` = unbounded).
    Range(Vec<(usize, Option<usize>)>),
    /// The allowed shapes; the description's default shape is among them.
    Enumerated(Vec<Vec<usize>>),
}

/// A multi-array input, output or state as the model description declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayFeature {
    /// `None` when the file declares a type corelm does not know.
    pub dtype: Option<DType>,
    /// The default shape; empty for outputs whose shape is only known at run time.
    pub shape: Vec<usize>,
    pub flexibility: Flexibility,
    pub optional: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FeatureKind {
    Array(ArrayFeature),
    State(ArrayFeature),
    /// Images, dictionaries, sequences and scalars: named, not modelled further.
    Other(&'static str),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Feature {
    pub name: String,
    pub kind: FeatureKind,
}

impl Feature {
    pub fn array(&self) -> Option<&ArrayFeature> {
        match &self.kind {
            FeatureKind::Array(a) | FeatureKind::State(a) => Some(a),
            FeatureKind::Other(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct FunctionDescription {
    pub name: String,
    pub inputs: Vec<Feature>,
    pub outputs: Vec<Feature>,
    pub states: Vec<Feature>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Metadata {
    pub short_description: String,
    pub version: String,
    pub author: String,
    pub license: String,
    pub user_defined: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    /// One entry per function; a single-function model has one, named `main`.
    pub functions: Vec<FunctionDescription>,
    /// Set exactly for multifunction models.
    pub default_function: Option<String>,
    pub metadata: Metadata,
}

impl ModelDescription {
    pub fn is_multifunction(&self) -> bool {
        self.default_function.is_some()
    }

    pub fn function(&self, name: &str) -> Option<&FunctionDescription> {
        self.functions.iter().find(|f| f.name == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub spec_version: i32,
    pub description: ModelDescription,
    pub program: Program,
}

impl Model {
    pub fn target(&self) -> Option<Target> {
        Target::from_spec_version(self.spec_version)
    }
}

/// The function name single-function models use.
pub const MAIN: &str = "main";

// ---------------------------------------------------------------- to proto

fn array_to_proto(a: &ArrayFeature) -> proto::ArrayFeatureType {
    use proto::array_feature_type::{EnumeratedShapes, Shape, ShapeFlexibility, ShapeRange};
    let shape_flexibility = match &a.flexibility {
        Flexibility::Fixed => None,
        Flexibility::Range(ranges) => Some(ShapeFlexibility::ShapeRange(ShapeRange {
            size_ranges: ranges
                .iter()
                .map(|&(lo, hi)| proto::SizeRange { lower_bound: lo as u64, upper_bound: hi.map_or(-1, |h| h as i64) })
                .collect(),
        })),
        Flexibility::Enumerated(shapes) => Some(ShapeFlexibility::EnumeratedShapes(EnumeratedShapes {
            shapes: shapes.iter().map(|s| Shape { shape: s.iter().map(|&d| d as i64).collect() }).collect(),
        })),
    };
    proto::ArrayFeatureType {
        shape: a.shape.iter().map(|&d| d as i64).collect(),
        data_type: a.dtype.and_then(|d| d.array_feature_code()).unwrap_or(0),
        shape_flexibility,
        default_optional_value: None,
    }
}

fn feature_to_proto(f: &Feature) -> proto::FeatureDescription {
    use proto::feature_type::Type;
    let (r#type, optional) = match &f.kind {
        FeatureKind::Array(a) => (Some(Type::MultiArrayType(array_to_proto(a))), a.optional),
        FeatureKind::State(a) => (
            Some(Type::StateType(proto::StateFeatureType {
                r#type: Some(proto::state_feature_type::Type::ArrayType(array_to_proto(a))),
            })),
            false,
        ),
        FeatureKind::Other(_) => (None, false),
    };
    proto::FeatureDescription {
        name: f.name.clone(),
        short_description: String::new(),
        r#type: Some(proto::FeatureType { r#type, is_optional: optional }),
    }
}

fn features_to_proto(fs: &[Feature]) -> Vec<proto::FeatureDescription> {
    fs.iter().map(feature_to_proto).collect()
}

impl Model {
    pub fn to_proto(&self) -> proto::Model {
        let d = &self.description;
        let m = &d.metadata;
        let mut description = proto::ModelDescription {
            metadata: Some(proto::Metadata {
                short_description: m.short_description.clone(),
                version_string: m.version.clone(),
                author: m.author.clone(),
                license: m.license.clone(),
                user_defined: m.user_defined.clone(),
            }),
            ..Default::default()
        };
        if let Some(default) = &d.default_function {
            description.default_function_name = default.clone();
            description.functions = d
                .functions
                .iter()
                .map(|f| proto::FunctionDescription {
                    name: f.name.clone(),
                    input: features_to_proto(&f.inputs),
                    output: features_to_proto(&f.outputs),
                    state: features_to_proto(&f.states),
                    ..Default::default()
                })
                .collect();
        } else if let Some(f) = d.functions.first() {
            description.input = features_to_proto(&f.inputs);
            description.output = features_to_proto(&f.outputs);
            description.state = features_to_proto(&f.states);
        }
        proto::Model {
            specification_version: self.spec_version,
            description: Some(description),
            is_updatable: false,
            r#type: Some(proto::model::Type::MlProgram(program_to_proto(&self.program))),
        }
    }

    /// Reads a decoded `Model` message; fails for models that are not ML Programs.
    pub fn from_proto(m: &proto::Model) -> Result<Model> {
        let program =
            match &m.r#type {
                Some(proto::model::Type::MlProgram(p)) => program_from_proto(p)?,
                None => return Err(Error::invalid(
                    "the model is not an ML Program (neural network, pipeline or other model types are not supported)",
                )),
            };
        let d = m.description.clone().unwrap_or_default();
        let functions: Vec<FunctionDescription> = if d.functions.is_empty() {
            vec![FunctionDescription {
                name: MAIN.into(),
                inputs: features_from_proto(&d.input)?,
                outputs: features_from_proto(&d.output)?,
                states: features_from_proto(&d.state)?,
            }]
        } else {
            d.functions
                .iter()
                .map(|f| {
                    Ok(FunctionDescription {
                        name: f.name.clone(),
                        inputs: features_from_proto(&f.input)?,
                        outputs: features_from_proto(&f.output)?,
                        states: features_from_proto(&f.state)?,
                    })
                })
                .collect::<Result<_>>()?
        };
        let default_function = (!d.functions.is_empty()).then(|| d.default_function_name.clone());
        let md = d.metadata.unwrap_or_default();
        Ok(Model {
            spec_version: m.specification_version,
            description: ModelDescription {
                functions,
                default_function,
                metadata: Metadata {
                    short_description: md.short_description,
                    version: md.version_string,
                    author: md.author,
                    license: md.license,
                    user_defined: md.user_defined,
                },
            },
            program,
        })
    }
}

// ---------------------------------------------------------------- from proto

fn usize_dims(values: &[i64], what: &str) -> Result<Vec<usize>> {
    values
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| Error::invalid(format!("{what}: negative dimension {v}"))))
        .collect()
}

fn array_from_proto(a: &proto::ArrayFeatureType, optional: bool, name: &str) -> Result<ArrayFeature> {
    use proto::array_feature_type::ShapeFlexibility;
    let shape = usize_dims(&a.shape, name)?;
    let flexibility = match &a.shape_flexibility {
        None => Flexibility::Fixed,
        Some(ShapeFlexibility::ShapeRange(r)) => Flexibility::Range(
            r.size_ranges
                .iter()
                .map(|s| {
                    let lo = usize::try_from(s.lower_bound)
                        .map_err(|_| Error::invalid(format!("{name}: range bound too large")))?;
                    let hi = if s.upper_bound < 0 { None } else { Some(s.upper_bound as usize) };
                    if hi.is_some_and(|h| h < lo) {
                        return Err(Error::invalid(format!("{name}: range [{lo}, {}] is empty", s.upper_bound)));
                    }
                    Ok((lo, hi))
                })
                .collect::<Result<_>>()?,
        ),
        Some(ShapeFlexibility::EnumeratedShapes(e)) => {
            Flexibility::Enumerated(e.shapes.iter().map(|s| usize_dims(&s.shape, name)).collect::<Result<_>>()?)
        }
    };
    Ok(ArrayFeature { dtype: DType::from_array_feature_code(a.data_type), shape, flexibility, optional })
}

fn features_from_proto(fs: &[proto::FeatureDescription]) -> Result<Vec<Feature>> {
    use proto::feature_type::Type;
    fs.iter()
        .map(|f| {
            let ty = f.r#type.as_ref();
            let optional = ty.is_some_and(|t| t.is_optional);
            let kind = match ty.and_then(|t| t.r#type.as_ref()) {
                Some(Type::MultiArrayType(a)) => FeatureKind::Array(array_from_proto(a, optional, &f.name)?),
                Some(Type::StateType(s)) => match &s.r#type {
                    Some(proto::state_feature_type::Type::ArrayType(a)) => {
                        FeatureKind::State(array_from_proto(a, false, &f.name)?)
                    }
                    None => return Err(Error::invalid(format!("state `{}` has no array type", f.name))),
                },
                Some(Type::Int64Type(_)) => FeatureKind::Other("int64"),
                Some(Type::DoubleType(_)) => FeatureKind::Other("double"),
                Some(Type::StringType(_)) => FeatureKind::Other("string"),
                Some(Type::ImageType(_)) => FeatureKind::Other("image"),
                Some(Type::DictionaryType(_)) => FeatureKind::Other("dictionary"),
                Some(Type::SequenceType(_)) => FeatureKind::Other("sequence"),
                None => FeatureKind::Other("untyped"),
            };
            Ok(Feature { name: f.name.clone(), kind })
        })
        .collect()
}
