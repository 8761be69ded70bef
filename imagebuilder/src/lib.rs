//! `imagebuilder`: tenant config + stock Ubuntu live-server ISO → zero-touch autoinstall ISO that
//! carries the tenant's bootstrap token, the static agent and its systemd unit.
//!
//! Pipeline: [`tenant`] (load and validate the config) → [`render`] (minijinja seed) → [`validate`]
//! (typed autoinstall, cloud-init schema) → [`build`] (stage files, md5sum.txt, build record) →
//! [`iso`] (the only module that runs xorriso).

pub mod build;
pub mod cli;
pub mod iso;
pub mod render;
pub mod tenant;
pub mod validate;
