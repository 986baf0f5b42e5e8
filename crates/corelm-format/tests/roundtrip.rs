//! Our writer and reader agree: every sample package reads back to the model that was written,
//! validates, and its blob references resolve.

use corelm_format::{samples, Package};

#[test]
fn samples_read_back_identically_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    for path in samples::write_all(dir.path()).unwrap() {
        let pkg = Package::open(&path).unwrap();
        let issues = pkg.validate();
        assert!(issues.is_empty(), "{}: {issues:?}", path.display());
        let reread = corelm_format::Model::from_proto(&pkg.model().to_proto()).unwrap();
        assert_eq!(&reread, pkg.model());
    }
}
