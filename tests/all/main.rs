//! Integration tests: the real `arges` binary against real clients on loopback.

mod harness;
mod tftp;
