//! Which vector extensions the CPU kernels may use: the widest the CPU has, unless
//! `TRITTER_CPU_KERNELS` caps them at `portable`, `avx2`, `avxvnni` or `avx512` (`amx`,
//! the default, caps nothing). One machine can then run, test and measure every tier it is
//! able to: CI runs the kernel tests under each, and a bench under a cap shows what a CPU
//! without the wider extensions gets.

use std::sync::OnceLock;

/// A tier of CPU kernels, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Portable Rust, vectorized by the compiler for the build's baseline (SSE2 on x86-64).
    Portable,
    /// AVX2 and FMA: every x86-64 CPU since Haswell (2013) and Zen.
    Avx2,
    /// AVX2 with AVX-VNNI, 256-bit integer dot products without AVX-512: Intel's cores
    /// from Alder Lake on (Xeons from Sapphire Rapids on have both), Zen 5.
    AvxVnni,
    /// AVX-512 (with VNNI and VBMI for the integer products): Ice Lake and later Xeons,
    /// Zen 4 and later.
    Avx512,
    /// AMX's tile multiplies beside AVX-512: Xeons from Sapphire Rapids on.
    Amx,
}

/// The variable that caps the tier.
pub const VARIABLE: &str = "TRITTER_CPU_KERNELS";

/// The widest tier `TRITTER_CPU_KERNELS` allows.
///
/// # Panics
/// Where the variable is set to anything but `portable`, `avx2`, `avxvnni`, `avx512` or
/// `amx`.
pub fn ceiling() -> Tier {
    static CEILING: OnceLock<Tier> = OnceLock::new();
    *CEILING.get_or_init(|| {
        parse(std::env::var(VARIABLE).ok().as_deref()).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn parse(value: Option<&str>) -> Result<Tier, String> {
    match value {
        None | Some("amx") => Ok(Tier::Amx),
        Some("avx512") => Ok(Tier::Avx512),
        Some("avxvnni") => Ok(Tier::AvxVnni),
        Some("avx2") => Ok(Tier::Avx2),
        Some("portable") => Ok(Tier::Portable),
        Some(other) => Err(format!(
            "{VARIABLE}={other:?}: expected portable, avx2, avxvnni, avx512 or amx"
        )),
    }
}

/// Whether kernels of `tier` may run (the CPU's own features are checked beside).
pub fn allows(tier: Tier) -> bool {
    tier <= ceiling()
}

/// The widest of `supported` (narrowest first, the first always allowed) whose tier,
/// `tier(choice)`, `TRITTER_CPU_KERNELS` allows.
pub fn widest<T: Copy>(supported: &[T], tier: impl Fn(T) -> Tier) -> T {
    *supported
        .iter()
        .rfind(|&&choice| allows(tier(choice)))
        .unwrap_or(&supported[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_parsed_and_unknown_ones_named() {
        assert_eq!(parse(None), Ok(Tier::Amx));
        assert_eq!(parse(Some("avx512")), Ok(Tier::Avx512));
        assert_eq!(parse(Some("avxvnni")), Ok(Tier::AvxVnni));
        assert_eq!(parse(Some("avx2")), Ok(Tier::Avx2));
        assert_eq!(parse(Some("portable")), Ok(Tier::Portable));
        let err = parse(Some("sse4")).unwrap_err();
        assert!(err.contains("TRITTER_CPU_KERNELS=\"sse4\""), "{err}");
        assert!(Tier::Portable < Tier::Avx2 && Tier::Avx2 < Tier::AvxVnni);
        assert!(Tier::AvxVnni < Tier::Avx512 && Tier::Avx512 < Tier::Amx);
    }
}
