//! Cluster tests: every test here runs against a real kube-apiserver that this test
//! binary starts (see `hookrun_tests::cluster`), each in a namespace of its own.

mod crds;
mod dev;
mod helm;
mod operator;
mod runner;
mod security_leaks;
mod sessions;
mod wait;
mod webhook;
