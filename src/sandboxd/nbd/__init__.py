"""NBD server and copy-on-write block devices: the rootfs provider of microVM sandboxes (seed 004).

- :mod:`~sandboxd.nbd.protocol`: wire constants and struct packing;
- :mod:`~sandboxd.nbd.cow`: :class:`CowDevice`, a read-only base image + a per-sandbox overlay;
- :mod:`~sandboxd.nbd.exports`: the pool of ready exports, metrics, events, state queries;
- :mod:`~sandboxd.nbd.server`: the asyncio server (fixed newstyle handshake, transmission);
- :mod:`~sandboxd.nbd.thread`: the server on its own event loop thread, with blocking calls;
- :mod:`~sandboxd.nbd.provider`: :class:`NbdRootfsProvider`, build id + sandbox dir → export path.
"""
