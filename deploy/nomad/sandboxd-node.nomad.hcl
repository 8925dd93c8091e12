# sandboxd on Nomad (2/2): a node on every client of class "sandboxd" (a system job; raw_exec: a
# node needs the host's namespaces, mounts and gVisor).

job "sandboxd-node" {
  datacenters = ["dc1"]
  type        = "system"

  constraint {
    attribute = "${node.class}"
    value     = "sandboxd"
  }

  group "node" {
    network {
      port "node" {
        static = 3900
      }
    }

    task "node" {
      driver       = "raw_exec"
      kill_timeout = "60s"
      config {
        command = "/opt/sandboxd/.venv/bin/sandboxd"
        args    = ["node", "--host", "${attr.unique.network.ip-address}", "--port", "3900"]
      }
      env {
        SANDBOXD_DATABASE_URL        = "postgresql+psycopg://sandboxd@db.internal:5432/sandboxd"
        SANDBOXD_CLUSTER_SECRET_FILE = "/etc/sandboxd/cluster.secret"
        SANDBOXD_NODE_ID             = "${node.unique.name}"
        SANDBOXD_DATA_DIR            = "/var/lib/sandboxd"
      }
    }
  }
}
