"""Pure decision logic, no Thespian and no I/O: the actors, the tests and the trace simulator call the same code.

`coordinator` is the ModeCoordinator's state machine (the GPU gate), `plan` its planner and `subscriptions` its
event fan-out list; the other modules are the other actors' cores and policies (sampler, retry, restart, ...)."""
