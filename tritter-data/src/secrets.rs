//! Secrets and personal data: private keys, cloud and service tokens, high-entropy values
//! assigned to names like `password` or `token`, emails and IP addresses. Each is
//! replaced by a placeholder (`<KEY>`, `<EMAIL>`, `<IP_ADDRESS>`), or the file is dropped,
//! as the recipe's `[secrets]` table says; every finding is reported with its kind and
//! line, never its text.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// What to do with a file that holds a secret.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SecretsAction {
    /// Replace each finding with its placeholder.
    #[default]
    Redact,
    /// Drop the file.
    Drop,
    /// Do not look.
    Off,
}

/// The recipe's `[secrets]` table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    pub action: SecretsAction,
    /// Leave emails and IP addresses as they are (personal data rather than credentials).
    pub keep_emails_and_ips: bool,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `private_key`, `aws_access_key`, `aws_secret_key`, `github_token`, `slack_token`,
    /// `google_api_key`, `secret_assignment`, `email` or `ip_address`.
    pub kind: &'static str,
    /// What replaces it: `<KEY>`, `<EMAIL>` or `<IP_ADDRESS>`.
    pub placeholder: &'static str,
    /// 1-based line of its start.
    pub line: usize,
    /// Byte range in the text.
    pub start: usize,
    pub end: usize,
}

struct Detector {
    kind: &'static str,
    placeholder: &'static str,
    regex: Regex,
    /// The capture group holding the secret (0: the whole match).
    group: usize,
    check: fn(&str, &str, usize) -> bool,
    personal: bool,
}

fn always(_: &str, _: &str, _: usize) -> bool {
    true
}

/// Shannon entropy of the characters, bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let n = s.chars().count() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// A value assigned to a secret-sounding name is a secret when it looks random: no
/// spaces, at least 3 bits of entropy per character, and not a placeholder.
fn random_looking(value: &str, _: &str, _: usize) -> bool {
    let lower = value.to_ascii_lowercase();
    ![
        "xxx", "changeme", "example", "your", "<", "{", "$", "%s", "***", "dummy", "test",
    ]
    .iter()
    .any(|p| lower.contains(p))
        && entropy(value) >= 3.0
}

/// Public addresses only: not loopback, private, link-local, broadcast or unspecified,
/// and not a version number (`v1.2.3.4`, `version 1.2.3.4`).
fn public_ip(ip: &str, text: &str, start: usize) -> bool {
    let octets: Vec<u8> = ip.split('.').filter_map(|o| o.parse().ok()).collect();
    let [a, b, ..] = octets[..] else {
        return false;
    };
    let private = a == 0
        || a == 10
        || a == 127
        || a >= 224
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168);
    let mut from = start.saturating_sub(12);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let before = text[from..start].to_ascii_lowercase();
    !private && !before.contains("version") && !before.ends_with('v')
}

static DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(|| {
    let d = |kind,
             placeholder,
             pattern: &str,
             group,
             check: fn(&str, &str, usize) -> bool,
             personal| {
        Detector {
            kind,
            placeholder,
            regex: Regex::new(pattern).expect("valid detector pattern"),
            group,
            check,
            personal,
        }
    };
    vec![
        d(
            "private_key",
            "<KEY>",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
            0,
            always,
            false,
        ),
        d(
            "aws_access_key",
            "<KEY>",
            r"(?-u:\b)(?:AKIA|ASIA)[0-9A-Z]{16}(?-u:\b)",
            0,
            always,
            false,
        ),
        d(
            "aws_secret_key",
            "<KEY>",
            r#"(?i)aws.{0,20}?(?:secret|key).{0,20}?['"]([0-9A-Za-z/+]{40})['"]"#,
            1,
            always,
            false,
        ),
        d(
            "github_token",
            "<KEY>",
            r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})(?-u:\b)",
            0,
            always,
            false,
        ),
        d(
            "slack_token",
            "<KEY>",
            r"(?-u:\b)xox[abposr]-[0-9A-Za-z-]{10,250}",
            0,
            always,
            false,
        ),
        d(
            "google_api_key",
            "<KEY>",
            r"(?-u:\b)AIza[0-9A-Za-z_-]{35}(?-u:\b)",
            0,
            always,
            false,
        ),
        d(
            "secret_assignment",
            "<KEY>",
            r#"(?i)(?:password|passwd|secret|token|api_?key|access_?key|private_?key)[a-z_]*['"]?\s*[:=]+\s*['"]([^'"\s]{12,200})['"]"#,
            1,
            random_looking,
            false,
        ),
        d(
            "email",
            "<EMAIL>",
            r"(?-u:\b)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?-u:\b)",
            0,
            always,
            true,
        ),
        d(
            "ip_address",
            "<IP_ADDRESS>",
            r"(?-u:\b)(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(?-u:\b)",
            0,
            public_ip,
            true,
        ),
    ]
});

impl SecretsConfig {
    /// Every finding in `text`, in order, without overlaps (the first detector wins).
    pub fn find(&self, text: &str) -> Vec<Finding> {
        if self.action == SecretsAction::Off {
            return Vec::new();
        }
        let mut found: Vec<Finding> = Vec::new();
        for detector in DETECTORS.iter() {
            if detector.personal && self.keep_emails_and_ips {
                continue;
            }
            for caps in detector.regex.captures_iter(text) {
                let Some(m) = caps.get(detector.group) else {
                    continue;
                };
                if !(detector.check)(m.as_str(), text, m.start()) {
                    continue;
                }
                if found.iter().any(|f| m.start() < f.end && f.start < m.end()) {
                    continue;
                }
                found.push(Finding {
                    kind: detector.kind,
                    placeholder: detector.placeholder,
                    line: 1 + text[..m.start()].bytes().filter(|&b| b == b'\n').count(),
                    start: m.start(),
                    end: m.end(),
                });
            }
        }
        found.sort_by_key(|f| f.start);
        found
    }

    /// `text` with every finding replaced by its placeholder.
    pub fn redact(text: &str, findings: &[Finding]) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            out.push_str(&text[at..f.start]);
            out.push_str(f.placeholder);
            at = f.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<&'static str> {
        SecretsConfig::default()
            .find(text)
            .iter()
            .map(|f| f.kind)
            .collect()
    }

    #[test]
    fn every_detector_finds_its_kind_and_redaction_hides_it() {
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nabc==\n-----END RSA PRIVATE KEY-----";
        let cases: Vec<(String, &str, &str)> = vec![
            (format!("KEY = \"\"\"{key}\"\"\"\n"), "private_key", "<KEY>"),
            (
                "id = 'AKIAIOSFODNN7EXAMPLQ'\n".into(),
                "aws_access_key",
                "<KEY>",
            ),
            (
                "aws_secret_access_key = \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKA\"\n".into(),
                "aws_secret_key",
                "<KEY>",
            ),
            (
                "token: ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789\n".into(),
                "github_token",
                "<KEY>",
            ),
            (
                "SLACK = 'xoxb-2048-1234567890-abcdefGHIJ'\n".into(),
                "slack_token",
                "<KEY>",
            ),
            (
                "key = \"AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY\"\n".into(),
                "google_api_key",
                "<KEY>",
            ),
            (
                "DB_PASSWORD = \"q8#Lz2!vR7^mW4@t\"\n".into(),
                "secret_assignment",
                "<KEY>",
            ),
            (
                "# contact: jane.doe@corp-mail.com\n".into(),
                "email",
                "<EMAIL>",
            ),
            (
                "HOST = '203.0.113.77'\n".into(),
                "ip_address",
                "<IP_ADDRESS>",
            ),
        ];
        for (text, kind, placeholder) in cases {
            let config = SecretsConfig::default();
            let found = config.find(&text);
            assert_eq!(found.len(), 1, "{kind}: {found:?} in {text}");
            assert_eq!(found[0].kind, kind);
            assert_eq!(found[0].line, 1);
            let redacted = SecretsConfig::redact(&text, &found);
            assert!(redacted.contains(placeholder), "{redacted}");
            assert!(config.find(&redacted).is_empty(), "{kind}: {redacted}");
        }
    }

    #[test]
    fn clean_code_passes_untouched() {
        for text in [
            include_str!("shard.rs"),
            include_str!("recipe.rs"),
            include_str!("build.rs"),
            "password = input('password: ')\ntoken = os.environ['GITHUB_TOKEN']\n",
            "PASSWORD = \"changeme-example-value\"\nversion = '1.2.3.4'\nHOST = '127.0.0.1'\n",
            "mask = '255.255.255.0'\nserver = ('192.168.1.20', 80)\n",
        ] {
            assert_eq!(kinds(text), Vec::<&str>::new(), "{text}");
        }
    }

    #[test]
    fn findings_report_their_line_and_personal_data_can_be_kept() {
        let text = "a = 1\n\nb = 'jane@example.org'\nc = 'AKIAIOSFODNN7EXAMPLQ'\n";
        let found = SecretsConfig::default().find(text);
        assert_eq!(
            found.iter().map(|f| (f.kind, f.line)).collect::<Vec<_>>(),
            [("email", 3), ("aws_access_key", 4)]
        );
        let keep = SecretsConfig {
            keep_emails_and_ips: true,
            ..Default::default()
        };
        assert_eq!(keep.find(text).len(), 1);
        let off = SecretsConfig {
            action: SecretsAction::Off,
            ..Default::default()
        };
        assert!(off.find(text).is_empty());
    }
}
