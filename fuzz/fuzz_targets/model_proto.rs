//! Arbitrary bytes as `model.mlmodel`: decoding, conversion, validation and printing must not panic.
#![no_main]
use corelm_format::model::FeatureKind;
use corelm_format::{mil, proto, Model};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = proto::Model::decode(data) else { return };
    let Ok(model) = Model::from_proto(&message) else { return };
    let _ = mil::validate::validate_model(&model);
    let _ = mil::printer::program_text(&model.program);
    // A model we could read must survive our own writer — except feature kinds corelm reads
    // only to report them (images, sequences, ...), which it does not write back.
    let again = Model::from_proto(&model.to_proto()).expect("a converted model converts back");
    let reported_only =
        model.description.functions.iter().any(|f| {
            f.inputs.iter().chain(&f.outputs).chain(&f.states).any(|x| matches!(x.kind, FeatureKind::Other(_)))
        });
    if !reported_only {
        assert_eq!(again, model);
    }
});
