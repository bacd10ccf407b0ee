"""The on-premise deployment kit: certificates, node keys, SuperLink/SuperNode launch helpers."""
