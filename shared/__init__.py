"""clipmesh: long-video generation across many GPU workers (the package both daemons import)."""

import os

# Every clipmesh process forks children while gRPC channels or servers are open (ffmpeg to
# encode or read a video, worker processes). gRPC's fork handlers then run its poller in the
# child ("epoll_wait error: Bad file descriptor") and break the child's pipes: 4 reads in 40 of
# an MP4 failed ("Could not load meta information") beside a polling client. No child of ours
# uses gRPC across a fork. Set before grpc is first imported (grpc reads it then).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
