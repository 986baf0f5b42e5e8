//! docs/devices.md cites the sources of the device table; its table must say what the code uses.

use corelm_deploy::devices::{Basis, DEVICES};

#[test]
fn the_documented_table_matches_the_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/devices.md")).unwrap();
    let table = doc.split("## The table").nth(1).expect("a table section");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| device"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), DEVICES.len());
    let basis = |b: Basis| format!("{b:?}");
    let num = |s: &str| s.parse::<f64>().unwrap();
    for (row, d) in rows.iter().zip(DEVICES) {
        assert_eq!(row[0], d.name);
        assert_eq!(row[1], d.chip, "{}", d.name);
        assert_eq!(num(row[2]), d.ram_gib, "{}", d.name);
        assert!((num(row[3]) - d.usable_gib).abs() < 0.006, "{}", d.name);
        assert_eq!(row[4], basis(d.usable_source), "{}", d.name);
        assert_eq!(num(row[5]), d.bandwidth_gbps, "{}", d.name);
        assert_eq!(row[6], basis(d.bandwidth_source), "{}", d.name);
        match d.neural_engine_tops {
            Some(t) => {
                assert_eq!(num(row[7]), t, "{}", d.name);
                assert_eq!(row[8], basis(d.tops_source), "{}", d.name);
            }
            None => assert_eq!(row[7], "—", "{}", d.name),
        }
    }
}
