// Validates custom resources with kubernetes-models' validators (compiled from the CRDs'
// openAPIV3Schema). stdin: a JSON list of objects; stdout: a JSON list of error lists.
// tests/published.py installs the packages and runs this beside their node_modules.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import {
  PrometheusRule,
  ServiceMonitor,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};
let input = "";
for await (const chunk of process.stdin) input += chunk;
const errors = JSON.parse(input).map((obj) => {
  const Model = models[`${obj.apiVersion}/${obj.kind}`];
  if (Model === undefined) return [`no validator for ${obj.apiVersion} ${obj.kind}`];
  try {
    new Model(obj).validate();
    return [];
  } catch (err) {
    return [String(err.message ?? err)];
  }
});
console.log(JSON.stringify(errors));
