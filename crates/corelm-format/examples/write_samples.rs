//! Writes the sample packages into a folder: `cargo run --example write_samples -- DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: write_samples DIR")?;
    std::fs::create_dir_all(&dir)?;
    for path in corelm_format::samples::write_all(dir.as_ref())? {
        println!("{}", path.display());
    }
    Ok(())
}
