//! Swap-out and swap-in: the steps and their crash-safe order (see `crate::swap`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::region::Region;
use crate::swap::{SwapInReport, SwapOutReport, SwapProgress};
use crate::vm_handle::VmHandle;

pub(crate) fn swap_out(
    _handle: &mut VmHandle,
    _destination: &Path,
    _progress: &mut dyn FnMut(SwapProgress),
) -> Result<SwapOutReport> {
    Err(Error::Unsupported("swap-out is not implemented yet".into()))
}

pub(crate) fn swap_in(
    _region: &Region,
    _source: &Path,
    _expected_name: Option<&str>,
    _keep: bool,
    _progress: &mut dyn FnMut(SwapProgress),
) -> Result<(VmHandle, SwapInReport)> {
    Err(Error::Unsupported("swap-in is not implemented yet".into()))
}
