//! The `profiler` tool behind `make profile-cpu|profile-all|profile-view|profile-analyze` and
//! `make bench-profiling-overhead`: it finds the running lab's services in the lab's state file,
//! drives the demo load with the loadgen library, fetches profiles from each service's
//! `/debug/pprof` endpoints (kit::debug), and turns them into files a person opens.
//!
//! * [`target`]: the services, their URLs and pids, the debug token.
//! * [`capture`]: `cpu` and `all` -> `profiles/<time>/<service>.{pb.gz,svg,collapsed}`, heap
//!   profiles and metrics snapshots.
//! * [`analyze`]: the CPU breakdown by category from `categories.toml`, top functions,
//!   suggestions; markdown on screen, JSON next to the profile.
//! * [`view`]: `index.html` of a profiles folder, opened or served.
//! * [`overhead`]: the cost of continuous profiling at 99 Hz, on vs off.

pub mod agent;
pub mod analyze;
pub mod capture;
pub mod overhead;
pub mod target;
pub mod view;
