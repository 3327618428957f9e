"""The trace simulator: days of an agent and a chat user replayed in virtual time against Mai and the policies it is
measured against, on the same trace, the same cost model and the same accounting.

    python -m bench.trace [--hours H] [--seed S] [--gpus 8,12,16,24] [--json] [--quick]

prints, for each GPU size, one row per policy (stall-s/h, stalls>1s/h, peak VRAM, OOMs, loads/h, thrash/h, CLIP
moves/h, requests given up, share of chat turns on the best model) and Mai's ratios to the targets of issue #5 with
PASS/MISS marks, all measured in that one run.

Where things are:
- `trace`: the requests (AUTOPILOT runs, RECORDING sessions, IDLE gaps, chat conversations), seeded.
- `params`: the cost model — footprints, load/unload/move times, CPU slowdowns — with published defaults.
- `runner`: plays the clients and defines a **stall**: the time a request waits beyond its service time because its
  model is not where it needs it (loads, unloads of others, the gate, VRAM coming back, retries after a refusal, CLIP
  embedding on the CPU, a partially offloaded model), counted once, from when the client sent it.
- `metrics`: the columns, from the runner's jobs and the GPU ledger; an **OOM** is an allocation refused because it
  did not fit what was free (CUDA's out-of-memory for a CLIP move or a chat load; llama.cpp's partial offload of a
  model that does not fit is not one, it shows as slowdown).
- `mai_policy`: Mai's rows — the real `mai.core.coordinator.Coordinator` in `mai.sim.world`, driven by the messages
  Mai's clients send (SetMode, AcquireLease/ReleaseLease, chat turns through the chat gate).
- `engine`, `baselines`, `oracle`: the other rows — always-unload, the strict mode policy, Ollama's defaults, and the
  clairvoyant oracles — on a simulated GPU with the same ledger, timings and physics as Mai's world.
- `report`: the rows, the table, the targets, the JSON.

Not measured here: the actor system itself (messaging latency, processes, memory); `bench/memory.py` does that.
Figures are simulated from the cost model, not measured on a GPU.
"""
