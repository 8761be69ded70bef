//! `imagebuilder`: tenant config + stock Ubuntu live-server ISO → zero-touch autoinstall ISO that
//! carries the tenant's bootstrap token, the static agent and its systemd unit.
//!
//! Pipeline: [`tenant`] (load and validate the config) → [`render`] (minijinja seed) → [`validate`]
//! (typed autoinstall, cloud-init schema) → [`prepared`] (the cached prepared ISO with fixed-size
//! slots for the per-tenant files) → [`build`] (copy, fill the slots, build record) → [`iso`] (the
//! only module that runs xorriso).

pub mod build;
pub mod cli;
pub mod iso;
pub mod prepared;
pub mod progress;
pub mod render;
pub mod resumable_sha256;
pub mod tenant;
pub mod validate;
