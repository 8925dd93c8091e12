# sandboxd on Nomad (1/2): the stateless API replicas. PostgreSQL is yours (the database URL);
# sandboxd is installed on the clients with ./sandboxd.sh; the cluster secret is a file on every
# client (/etc/sandboxd/cluster.secret, mode 0600). `nomad job run` this and sandboxd-node.nomad.hcl.

job "sandboxd-api" {
  datacenters = ["dc1"]
  type        = "service"

  group "api" {
    count = 2

    network {
      port "http" {
        static = 3000
      }
    }

    service {
      name = "sandboxd-api"
      port = "http"
      check {
        type     = "http"
        path     = "/health"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "api" {
      driver = "raw_exec"
      config {
        command = "/opt/sandboxd/.venv/bin/sandboxd"
        args    = ["api", "--host", "0.0.0.0", "--port", "3000"]
      }
      env {
        SANDBOXD_DATABASE_URL        = "postgresql+psycopg://sandboxd@db.internal:5432/sandboxd"
        SANDBOXD_CLUSTER_SECRET_FILE = "/etc/sandboxd/cluster.secret"
        SANDBOXD_SECRETS_KEY_FILE    = "/etc/sandboxd/secrets.key"
        SANDBOXD_DATA_DIR            = "/var/lib/sandboxd-api"
      }
    }
  }
}
