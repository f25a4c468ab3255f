//! Client commands: `kms bench`, `kms import-key`, `kms token`, `kms audit verify`. The
//! server never imports this module.

pub mod audit;
pub mod backup;
pub mod bench;
pub mod command_line;
pub mod connect;
pub mod import_key;
pub mod progress;
pub mod store;
pub mod token;

pub use command_line::run;
