// Command etcd is the etcd server at the version the Kubernetes release pins,
// built through etcdmain (etcd's own server/go.mod has local replaces, so it
// cannot be `go install`ed directly). Test tooling only.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
