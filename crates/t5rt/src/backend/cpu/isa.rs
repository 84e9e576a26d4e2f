//! Instruction-set levels of the CPU kernels: detected at run time (and the default chosen
//! from them), forced with `T5RT_ISA` (for tests and benchmarks), and the one place that says
//! which kernel each precision runs at each level.

use crate::backend::WeightDtype;
use crate::error::{Result, T5Error};

/// What the CPU kernels may use. Each level includes every level below it, so a CPU that has
/// a level can run all the lower ones too (the tests run every level the machine has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IsaLevel {
    /// Baseline x86-64 (SSE2) or any other architecture: plain Rust.
    #[default]
    Portable,
    /// AVX2 and FMA (Haswell and later, AMD Zen 1 to 3).
    Avx2,
    /// AVX-512 F, BW and VL with FMA (Skylake-SP and later servers).
    Avx512bw,
    /// The above and AVX-512 VNNI (`vpdpbusd`: Cascade Lake, Ice Lake, Zen 4).
    Avx512Vnni,
    /// The above and AVX-512 BF16 (`vdpbf16ps`: Cooper Lake, Sapphire Rapids, Zen 4; the
    /// default on Zen 4, not on Intel: see [`IsaLevel::preferred`]).
    Avx512Bf16,
}

impl IsaLevel {
    /// Every level, lowest first.
    pub const ALL: [IsaLevel; 5] = [
        IsaLevel::Portable,
        IsaLevel::Avx2,
        IsaLevel::Avx512bw,
        IsaLevel::Avx512Vnni,
        IsaLevel::Avx512Bf16,
    ];

    /// The name `T5RT_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            IsaLevel::Portable => "portable",
            IsaLevel::Avx2 => "avx2",
            IsaLevel::Avx512bw => "avx512bw",
            IsaLevel::Avx512Vnni => "avx512-vnni",
            IsaLevel::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// The CPU features this level adds to the one below it (as Linux's /proc/cpuinfo names
    /// them), for messages.
    pub fn features(self) -> &'static str {
        match self {
            IsaLevel::Portable => "none",
            IsaLevel::Avx2 => "avx2 fma",
            IsaLevel::Avx512bw => "avx512f avx512bw avx512vl",
            IsaLevel::Avx512Vnni => "avx512_vnni",
            IsaLevel::Avx512Bf16 => "avx512_bf16",
        }
    }

    /// Whether this CPU has everything the level needs.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                IsaLevel::Portable => true,
                IsaLevel::Avx2 => has!("avx2") && has!("fma"),
                IsaLevel::Avx512bw => {
                    IsaLevel::Avx2.available()
                        && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                }
                IsaLevel::Avx512Vnni => IsaLevel::Avx512bw.available() && has!("avx512vnni"),
                IsaLevel::Avx512Bf16 => IsaLevel::Avx512Vnni.available() && has!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == IsaLevel::Portable
        }
    }

    /// The highest level this CPU has.
    pub fn detect() -> IsaLevel {
        IsaLevel::ALL
            .into_iter()
            .rev()
            .find(|l| l.available())
            .unwrap_or(IsaLevel::Portable)
    }

    /// The level t5rt runs at unless told otherwise: the highest this CPU has, except on
    /// Intel CPUs with AVX-512 BF16, where `avx512-vnni` runs instead. There `vdpbf16ps`
    /// does a quarter of the FMA's instructions a cycle, so its 32 multiply-adds an
    /// instruction give half of f32 FMA's rate (register-only ceilings, one core of an
    /// Emerald Rapids Xeon: 83 against 169 G operations/s, `bench/ceilings/bf16_dot_vs_fma.c`),
    /// and bf16 weights widened to f32 in registers run twice as fast as the dot tile; on Zen
    /// 4 `vdpbf16ps` runs at twice the FMA's rate and stays. The two levels differ only in
    /// the bf16 tiles, so this choice changes bf16 alone (to the widened tiles' contract:
    /// activations not rounded). `T5RT_ISA=avx512-bf16` still runs the dot tile there.
    pub fn preferred() -> IsaLevel {
        Self::preferred_of(IsaLevel::detect(), intel_cpu())
    }

    /// [`IsaLevel::preferred`] for a CPU whose highest level is `top`.
    pub fn preferred_of(top: IsaLevel, intel: bool) -> IsaLevel {
        if top == IsaLevel::Avx512Bf16 && intel {
            IsaLevel::Avx512Vnni
        } else {
            top
        }
    }

    /// Every level this CPU has, lowest first.
    pub fn available_levels() -> Vec<IsaLevel> {
        IsaLevel::ALL
            .into_iter()
            .filter(|l| l.available())
            .collect()
    }

    /// The level to run at: `T5RT_ISA` when set (any level this CPU has), else
    /// [`IsaLevel::preferred`].
    pub fn from_env() -> Result<IsaLevel> {
        match std::env::var("T5RT_ISA") {
            Ok(v) if !v.is_empty() => {
                let level: IsaLevel = v.parse().map_err(T5Error::Backend)?;
                level.checked()
            }
            _ => Ok(IsaLevel::preferred()),
        }
    }

    /// `self`, or an error naming what this CPU lacks.
    pub fn checked(self) -> Result<IsaLevel> {
        if self.available() {
            return Ok(self);
        }
        let missing = IsaLevel::ALL
            .into_iter()
            .filter(|l| *l <= self && !l.available())
            .map(IsaLevel::features)
            .collect::<Vec<_>>()
            .join(" ");
        Err(T5Error::Backend(format!(
            "kernel level {} needs CPU features this CPU lacks ({missing}); the highest it has is {}",
            self.name(),
            IsaLevel::detect().name()
        )))
    }

    /// Whether bf16 products round the activations to bf16 at this level (`vdpbf16ps`, and the
    /// portable code that follows it), or keep them in f32 (the widened tiles of AVX2 and
    /// AVX-512 without BF16).
    pub fn bf16_rounds_activations(self) -> bool {
        self == IsaLevel::Portable || self == IsaLevel::Avx512Bf16
    }

    /// Whether the AVX-512 kernels (f32 tiles, attention, activations, quantization) run.
    pub fn avx512(self) -> bool {
        self >= IsaLevel::Avx512bw
    }

    /// The tile the linear layers of `dtype` run at this level (named in summaries).
    pub fn kernel(self, dtype: WeightDtype) -> &'static str {
        use IsaLevel::*;
        match (dtype, self) {
            (WeightDtype::F32, Avx512bw | Avx512Vnni | Avx512Bf16) => "avx512 fma",
            (WeightDtype::F32, Avx2) => "avx2 fma",
            (WeightDtype::Bf16, Avx512Bf16) => "avx512-bf16 vdpbf16ps",
            (WeightDtype::Bf16, Avx512bw | Avx512Vnni) => "avx512 bf16-widened fma",
            (WeightDtype::Bf16, Avx2) => "avx2 bf16-widened fma",
            (WeightDtype::Int8, Avx512Vnni | Avx512Bf16) => "avx512-vnni vpdpbusd",
            (WeightDtype::Int8, Avx512bw) => "avx512bw vpmaddwd",
            (WeightDtype::Int8, Avx2) => "avx2 vpmaddwd (1-4 rows: vpmaddubsw)",
            (WeightDtype::F16, _) => "none (f16 is a CUDA precision)",
            (_, Portable) => "portable",
        }
    }
}

/// [`cpu_is_intel`], asked once per process (`cpuid` traps to the hypervisor in a VM): for
/// choices measured to go one way on Intel's cores and the other on AMD's.
pub(super) fn intel_cpu() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(cpu_is_intel)
}

/// Whether the CPU's vendor string (`cpuid` leaf 0) is Intel's.
fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `cpuid` leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The size of one core's L2 cache in bytes as `cpuid` reports it (leaf `0x8000_0006`, which
/// Intel and AMD both fill), asked once per process; `None` where it does not say (other
/// architectures, some hypervisors).
pub(super) fn l2_bytes() -> Option<usize> {
    static L2: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *L2.get_or_init(cpu_l2_bytes)
}

fn cpu_l2_bytes() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // SAFETY: leaf 0x8000_0000 exists on every x86-64 CPU and names the highest extended
        // leaf; 0x8000_0006 is read only where that reaches it.
        #[allow(unused_unsafe)]
        let max = unsafe { __cpuid(0x8000_0000) }.eax;
        if max < 0x8000_0006 {
            return None;
        }
        #[allow(unused_unsafe)]
        let kib = (unsafe { __cpuid(0x8000_0006) }.ecx >> 16) as usize;
        (kib > 0).then_some(kib << 10)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

impl std::str::FromStr for IsaLevel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        IsaLevel::ALL
            .into_iter()
            .find(|l| l.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = IsaLevel::ALL.iter().map(|l| l.name()).collect();
                format!("T5RT_ISA=`{s}`: expected one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for IsaLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
