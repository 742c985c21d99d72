"""The builder layer: how a registry name becomes an optimizer object.

`construct` builds one name's own class (backend quirks applied, the result checked against the name's claims);
`lowrank`, `in_backward` and `offload` assemble the names made of other optimizers. The plain optimizer classes in
`lit_optim/optimizers/` know nothing of names: they take an optimizer class or factory, and these modules supply
one built from a spec. `lit_optim/build.py` (the front door) and the spec modules call in here; nothing here looks
names up in the registry (a composite name's inner spec is bound when the spec is declared, or found through
`BuildContext.lookup`), so the import graph stays one-way: build -> registry -> specs -> builders -> optimizers.
"""
