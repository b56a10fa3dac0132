//! Integration tests: the real `arges` binary against real clients on loopback.

mod agent;
mod chassis;
mod config;
mod console;
mod crash;
mod dhcp;
mod http;
mod identity;
mod ipmi;
mod limits;
mod loadtest;
mod observability;
mod plugin_kit;
mod plugins;
mod power;
mod redfish;
mod shutdown;
mod tftp;
mod tls;
