"""The cluster: links between servers, discovery, the peer directory and the gateway (docs/cluster.md)."""
