//! How the process's allocator treats freed buffers, set per workload.
//!
//! glibc serves a large allocation with its own mapping and unmaps it on free (above a
//! threshold it raises adaptively), or returns a heap's free top to the OS past a trim
//! threshold. Training and streaming want opposite things from that.

/// Training allocates and frees the same activation and gradient buffers every step.
/// Keep freed memory in the heap (mappings only above 32 MiB, no trimming below 1 GiB) so
/// that a step reuses the previous step's pages instead of faulting fresh zeroed ones in:
/// on the `test` preset on 2 CPU cores, the page faults otherwise cost ~15 % of a step.
/// The resident set stays at the step's peak.
pub fn retain_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Serve every allocation of 4 MiB or more with its own mapping, so that a dropped
/// layer group's buffers go back to the OS at once. glibc otherwise raises its mapping
/// threshold after the first large free and keeps later buffers in heaps it may never
/// trim, and the resident set would creep past the budget over many group swaps. Smaller
/// buffers (a decode step's activations, up to hundreds of KiB at batch 16) stay in the
/// heap, with up to 8 MiB of free top kept, so that each step reuses pages instead of
/// faulting in fresh zeroed ones (~10 % of a batch-16 decode pass on 2 CPU cores).
pub fn return_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
