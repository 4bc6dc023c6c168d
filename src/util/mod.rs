pub mod exec;
pub mod failpoint;
pub mod fsutil;
