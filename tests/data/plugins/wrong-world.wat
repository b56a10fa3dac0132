;; A component that exports `decide` with another signature (as a future or foreign
;; contract would): it must be refused at load, naming what it exports.
(component
  (core module $m
    (func (export "decide") (result i32) i32.const 7))
  (core instance $i (instantiate $m))
  (func (export "decide") (result u32) (canon lift (core func $i "decide"))))
