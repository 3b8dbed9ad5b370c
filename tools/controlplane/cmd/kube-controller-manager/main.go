// Command kube-controller-manager is upstream's kube-controller-manager main, built from the
// published k8s.io/kubernetes module. Test tooling only: the e2e tests run its CSR signing
// controller (kubernetes.io/kube-apiserver-client) for `lbappliance enroll`.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register" // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version" // for version metric registration
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	command := app.NewControllerManagerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
