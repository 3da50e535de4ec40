//! Who can take work, and which work goes where: the [`registry`] of runners and live leases
//! (in memory; heartbeats touch only it) and the pure [`planner`] that matches lease candidates
//! to free slots. The coordinator's dispatch loop reads both and commits what the planner
//! decides.

pub mod planner;
pub mod registry;
