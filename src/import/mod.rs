//! Bringing models trained elsewhere into our format: torch checkpoint containers read
//! without executing their pickles, and the mapping of OpenPCDet's CenterPoint onto our
//! model description and parameter names.

pub mod openpcdet;
pub mod pickle;
pub mod torch_file;

pub use openpcdet::{ImportError, Imported, import as import_openpcdet};
pub use torch_file::{Checkpoint, TorchFileError};
