"""The ``zenith`` command. It reaches the local pageserver only over the wire protocol."""
