//! Cluster tests: every test here runs against a real kube-apiserver that this test
//! binary starts (see `hookrun_tests::cluster`), each in a namespace of its own.

mod callbacks;
mod cli;
mod concurrency;
mod console;
mod crds;
mod dev;
mod drain;
mod event_keys;
mod events;
mod faults;
mod grants;
mod helm;
mod live;
mod operator;
mod runner;
mod schedule;
mod security_input;
mod security_leaks;
mod security_logs;
mod security_policy;
mod security_readapi;
mod security_replay;
mod security_secrets;
mod sessions;
mod supervisors;
mod triggers;
mod wait;
mod webhook;
