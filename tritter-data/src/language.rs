use serde::{Deserialize, Serialize};
use std::path::Path;

/// Languages Tritter trains on. Triton is Python that imports `triton` and defines a
/// `@triton.jit` kernel; it is recorded as its own language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Rust,
    Triton,
}

impl Language {
    pub const ALL: [Language; 3] = [Language::Python, Language::Rust, Language::Triton];

    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Rust => "rust",
            Language::Triton => "triton",
        }
    }

    pub fn parse(name: &str) -> Option<Language> {
        Language::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    /// Detects the language from the file extension, a shebang, and (for Python) whether
    /// it is a Triton kernel file. `None` for anything else.
    pub fn detect(path: &Path, content: &[u8]) -> Option<Language> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let base = match ext {
            "py" | "pyi" => Some(Language::Python),
            "rs" => Some(Language::Rust),
            "" => shebang_language(content),
            _ => None,
        }?;
        if base == Language::Python && is_triton_kernel(content) {
            return Some(Language::Triton);
        }
        Some(base)
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn shebang_language(content: &[u8]) -> Option<Language> {
    let first_line = content.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(first_line).ok()?;
    (line.starts_with("#!") && line.contains("python")).then_some(Language::Python)
}

/// True when the source imports triton and decorates a function with `@triton.jit`
/// (or `@jit` imported from triton).
pub fn is_triton_kernel(content: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(content) else {
        return false;
    };
    let mut imports_triton = false;
    let mut imports_jit = false;
    let mut has_kernel = false;
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("import triton") {
            imports_triton = true;
        } else if line.starts_with("from triton") {
            imports_triton = true;
            if line.contains(" import ") && line.contains("jit") {
                imports_jit = true;
            }
        } else if line.starts_with("@triton.jit") || (imports_jit && line.starts_with("@jit")) {
            has_kernel = true;
        }
    }
    imports_triton && has_kernel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_extension_shebang_and_triton() {
        assert_eq!(
            Language::detect(Path::new("a.rs"), b"fn main(){}"),
            Some(Language::Rust)
        );
        assert_eq!(
            Language::detect(Path::new("a.py"), b"x = 1"),
            Some(Language::Python)
        );
        assert_eq!(
            Language::detect(Path::new("tool"), b"#!/usr/bin/env python3\n"),
            Some(Language::Python)
        );
        assert_eq!(Language::detect(Path::new("a.c"), b"int x;"), None);
        let kernel =
            b"import triton\nimport triton.language as tl\n\n@triton.jit\ndef k(x):\n    pass\n";
        assert_eq!(
            Language::detect(Path::new("k.py"), kernel),
            Some(Language::Triton)
        );
        // Importing triton without defining a kernel is plain Python.
        assert_eq!(
            Language::detect(Path::new("k.py"), b"import triton\n"),
            Some(Language::Python)
        );
        let from_jit = b"from triton import jit\n@jit\ndef k(): pass\n";
        assert_eq!(
            Language::detect(Path::new("k.py"), from_jit),
            Some(Language::Triton)
        );
    }
}
