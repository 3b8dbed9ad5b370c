// Command kube-proxy is upstream's kube-proxy main, built from the published
// k8s.io/kubernetes module so the e2e tests and the lab run the real NodePorts,
// /healthz and healthCheckNodePorts on their nodes. Test tooling only.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // for client metric registration
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

func main() {
	command := app.NewProxyCommand()
	code := cli.Run(command)
	os.Exit(code)
}
