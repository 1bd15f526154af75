//! The swap file format (docs/multi-vm.md, "Swap file format").

use std::path::Path;

use crate::error::{Error, Result};
use crate::swap::SwapFileSummary;

pub(crate) fn inspect(_path: &Path) -> Result<SwapFileSummary> {
    Err(Error::Unsupported(
        "swap files are not implemented yet".into(),
    ))
}
