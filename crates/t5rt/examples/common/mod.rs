//! Shared by the kernel-timing examples.

/// Environment variable `var` as a number above 0, or `default` when it is not set; a panic
/// naming `var` and what it should hold (`what`) when it is set to anything else (these are
/// tools for working on the kernels, not the library).
pub fn positive_env(var: &str, default: usize, what: &str) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| panic!("{var}: {what}")),
        Err(_) => default,
    }
}
