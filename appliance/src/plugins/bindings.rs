//! Host bindings of the `arges:plugin` WIT package, generated once here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "boot-policy",
    exports: { default: async },
});
