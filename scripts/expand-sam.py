"""Expands infra/template.yaml's SAM resources into plain CloudFormation, offline, with
aws-sam-translator: cfn-lint 1.x does not look inside AWS::Serverless::* resources, so
scripts/check-infra lints (and checkov scans) the expansion as well.

Usage: python expand-sam.py TEMPLATE OUT.json
"""
import json
import os
import sys

from cfnlint.decode import cfn_yaml
from samtranslator.translator.transform import transform

# The managed policies SAM may attach, by name (the real loader asks IAM; this runs offline).
MANAGED = {
    "AWSLambdaBasicExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "AWSLambdaRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaRole",
    "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
}


class OfflinePolicies:
    def load(self):
        return MANAGED


def expand(source, code_uris=None):
    """The template at `source` as plain CloudFormation. `code_uris` maps a function's
    logical id to its built artifact (s3://bucket/key); without one, any S3 URI stands
    for it (`sam build` replaces the local CodeUri by the built artifact)."""
    # The translator wants a region for pseudo parameters; any will do for linting.
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    code_uris = code_uris or {}
    template = cfn_yaml.load(source)
    template.get("Globals", {}).get("Function", {})["CodeUri"] = "s3://crr-lint/code.zip"
    for name, resource in template["Resources"].items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = resource.setdefault("Properties", {})
        if name in code_uris:
            props["CodeUri"] = code_uris[name]
        elif "CodeUri" in props:
            props["CodeUri"] = "s3://crr-lint/code.zip"
    return transform(template, {}, OfflinePolicies(), passthrough_metadata=True)


def main():
    source, out = sys.argv[1], sys.argv[2]
    expanded = expand(source)
    with open(out, "w") as f:
        json.dump(expanded, f, indent=1, default=str)


if __name__ == "__main__":
    main()
