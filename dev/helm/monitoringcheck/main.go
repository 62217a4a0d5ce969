// monitoringcheck reads Kubernetes YAML documents on stdin and decodes every
// monitoring.coreos.com/v1 ServiceMonitor, PodMonitor and PrometheusRule strictly into
// prometheus-operator's own Go types: an unknown or misspelt field, or a value of the wrong
// type, is an error. The test cluster has no prometheus-operator CRDs to dry-run them against;
// this is the next best judge. Other documents are skipped. Prints one line per object checked.
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"sigs.k8s.io/yaml"
)

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

func main() {
	data, err := io.ReadAll(bufio.NewReader(os.Stdin))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	failed := false
	for _, doc := range bytes.Split(data, []byte("\n---")) {
		var meta typeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil || meta.APIVersion != "monitoring.coreos.com/v1" {
			continue
		}
		var target any
		switch meta.Kind {
		case "ServiceMonitor":
			target = &monitoringv1.ServiceMonitor{}
		case "PodMonitor":
			target = &monitoringv1.PodMonitor{}
		case "PrometheusRule":
			target = &monitoringv1.PrometheusRule{}
		default:
			fmt.Printf("unknown %s %s\n", meta.Kind, meta.Metadata.Name)
			failed = true
			continue
		}
		if err := yaml.UnmarshalStrict(doc, target); err != nil {
			fmt.Printf("invalid %s %s: %v\n", meta.Kind, meta.Metadata.Name, err)
			failed = true
			continue
		}
		fmt.Printf("ok %s %s\n", meta.Kind, meta.Metadata.Name)
	}
	if failed {
		os.Exit(1)
	}
}
