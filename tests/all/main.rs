//! Integration tests: the real `arges` binary against real clients on loopback.

mod agent;
mod harness;
mod http;
mod tftp;
