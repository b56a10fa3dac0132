//! Host bindings of the `arges:plugin` WIT package, generated once here: the boot-policy
//! world at the top, the bmc-driver world in [`driver`] (sharing `log` and `config`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "boot-policy",
    exports: { default: async },
});

/// The `bmc-driver` world. Its `ipmi` and `http` imports are async: they talk to the BMC.
pub mod driver {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "bmc-driver",
        imports: {
            "arges:plugin/ipmi": async,
            "arges:plugin/http": async,
        },
        exports: { default: async },
        with: {
            "arges:plugin/log": super::arges::plugin::log,
            "arges:plugin/config": super::arges::plugin::config,
        },
    });
}
