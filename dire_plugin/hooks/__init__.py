"""Hooks: what a patch declares (:mod:`.declare`), the method registry (:mod:`.registry`), the run
settings (:mod:`.settings`), the runtime core every method shares (:mod:`.runtime`; SIGTERM
ending a run as Ctrl-C does in :mod:`.termination`), the interface of a capture module (:mod:`.capture`) and one capture module per method family
(:mod:`.decoupled` for SRe²L/CDA/DWA/DELT/PRISM/G-VBSM/EDC, :mod:`.embedded` for DM, :mod:`.stepwise` for
MTT; DiRe across torch.distributed ranks in :mod:`.distributed`, in workers that
``torch.multiprocessing.spawn`` starts in :mod:`.workers`), put together by :mod:`.patcher`. May
import ``embeddings``, ``regularizer``, ``io`` and ``errors``.

The capture interface
---------------------
A capture module finds the synthetic embeddings of a synthesis step inside the method's own
computation and gets DiRe's gradient to the images; the core does everything else (bank, memory,
the term, counters, logs, the step check, the manifest). A new family subclasses
:class:`.capture.Capture` and registers one line in :data:`.patcher.FAMILIES`:

1. ``wrappers()``: ``(module, attribute path, wrapper)`` to install when the module is imported
   (torch, PIL, or an upstream module of the checkout, e.g. ``networks.ConvNet.embed``). Each
   wrapper of the training path asks :func:`.runtime.active_capture` and passes through on
   ``None`` (another family's run, or ``runtime.active`` False); where outputs are saved, so that
   the manifest goes beside them, is one :func:`.runtime.output_saved` wrapper of the save call.
2. ``install(core)`` / ``uninstall()``: global hooks of its own (module forward hooks, ...).
3. When it sees the embeddings of a synthesis step: ``key = core.key_for(teacher, layer, device)``
   (the teacher's bank is built at its first call; or, like DM, the method's own real embeddings
   of the step as ``real=``), then ``grad = core.term_gradient(emb, labels, key=key)``
   (∂L_syn/∂emb against that teacher's bank and memory, logged and counted), then its own way of
   adding ``grad``'s effect to the images, calling ``core.term_reached_images()`` when it has (a
   tensor hook during the method's backward, an ``autograd.grad`` to the images, a direct
   ``image.grad`` update). Several teachers (rotating, or a committee in one step) are several
   keys; one teacher may leave ``key`` out (see :mod:`.runtime`, "Keys").
4. ``is_synthesis_step(optimizer)``: which optimizer steps update images (default: an optimizer
   over plain tensors). For each, the core calls ``before_step(optimizer)`` (the last moment to
   add a gradient), stops the run if the term did not reach the images (``missing_reason()``),
   then ``after_step(optimizer)`` (e.g. ``core.commit_to_memory(emb, labels, key=key)`` when a
   batch of images is finished).
5. ``manifest()``: family-specific counts; ``core.note_output_dir(folder)`` puts the manifest
   beside the outputs (outside the upstream checkout). Forwards the method runs for anything else go inside ``core.suspended()``.
"""
