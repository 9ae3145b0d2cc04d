"""The orchestrator as a cluster: nodes coordinated through etcd (see ``_etcd``)."""
