//! Prints a GGUF file's header, metadata (values truncated) and tensor table.
//!
//! cargo run -p corelm-convert --example gguf_dump -- FILE.gguf [--tokenizer OUT.json] [--tokenizer-config OUT.json] [--dequantize NAME] [--write-f32 NAME=PATH]

use corelm_convert::gguf::{self, GgufFile};
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: gguf_dump FILE.gguf [--tokenizer OUT.json] [--tokenizer-config OUT.json] [--dequantize TENSOR] [--write-f32 NAME=PATH]");
        std::process::exit(2);
    };
    let f = GgufFile::open(path)?;
    println!("{}: GGUF v{}, {} bytes", path, f.version(), f.file_len());
    println!("alignment {}, data section at {}", f.alignment(), f.data_start());
    println!("{} metadata entries:", f.metadata().len());
    for key in f.metadata_keys() {
        let v = &f.metadata()[key];
        println!("  {key} ({}) = {}", v.type_name(), v.display_truncated(100));
    }
    println!("{} tensors:", f.tensors().len());
    let mut by_type: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in f.tensors() {
        println!("  {:<40} {:<6} {:?} offset {} ({} bytes)", t.name, t.dtype.name(), t.shape, t.offset, t.byte_len);
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.byte_len;
    }
    for (ty, (n, bytes)) in by_type {
        println!("  {ty}: {n} tensors, {bytes} bytes");
    }
    println!("special tokens: {:?}", gguf::special_token_ids(&f)?);
    println!("chat template: {}", gguf::chat_template(&f).map_or("none".into(), |t| format!("{} chars", t.len())));

    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or("missing value after flag")?;
        match flag.as_str() {
            "--tokenizer" => {
                let json = gguf::tokenizer_json(&f)?;
                std::fs::write(value, serde_json::to_string_pretty(&json)?)?;
                println!("wrote {value}");
            }
            "--tokenizer-config" => {
                let json = gguf::tokenizer_config_json(&f)?;
                std::fs::write(value, serde_json::to_string_pretty(&json)?)?;
                println!("wrote {value}");
            }
            "--dequantize" => {
                let t = f.tensor(value).ok_or("no such tensor")?;
                let start = std::time::Instant::now();
                let data = f.dequantize(t)?;
                let (mut lo, mut hi, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0f64);
                for &x in &data {
                    lo = lo.min(x);
                    hi = hi.max(x);
                    sum += f64::from(x);
                }
                println!(
                    "{value}: {} values in {:?}, min {lo}, max {hi}, mean {}, first {:?}",
                    data.len(),
                    start.elapsed(),
                    sum / data.len().max(1) as f64,
                    &data[..data.len().min(6)]
                );
            }
            "--write-f32" => {
                // NAME=PATH: the dequantized tensor as little-endian f32.
                let (name, out) = value.split_once('=').ok_or("expected NAME=PATH")?;
                let t = f.tensor(name).ok_or("no such tensor")?;
                let bytes: Vec<u8> = f.dequantize(t)?.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(out, bytes)?;
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(())
}
