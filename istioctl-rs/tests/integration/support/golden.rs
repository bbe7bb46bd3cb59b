//! A golden file: `text` must equal `path`'s content; with UPDATE_GOLDENS
//! set, `path` is rewritten first. `hint` says how to rerun when the change is
//! meant.

pub fn check(path: &str, text: &str, what: &str, hint: &str) {
    if std::env::var_os("UPDATE_GOLDENS").is_some() {
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }
    let golden = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        text, golden,
        "{what} changed; if that is meant, UPDATE_GOLDENS=1 {hint}"
    );
}
